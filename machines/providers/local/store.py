"""The marketplace's persistent world: one SQLite file in the state dir, written through on every change.

Only the server process opens it (one connection, guarded by the server's lock); rows are JSON
documents so the schema stays a detail of this file.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS hosts (name TEXT PRIMARY KEY, spec TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS instances (id INTEGER PRIMARY KEY, data TEXT NOT NULL);
"""


class Store:
    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def get_setting(self, key: str, default: Any = None) -> Any:
        with self._lock:
            row = self._db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set_setting(self, key: str, value: Any) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO settings (key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, json.dumps(value)),
            )

    def hosts(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT spec FROM hosts ORDER BY name").fetchall()
        return [json.loads(r[0]) for r in rows]

    def replace_hosts(self, specs: list[dict[str, Any]]) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM hosts")
            self._db.executemany(
                "INSERT INTO hosts (name, spec) VALUES (?, ?)", [(s["name"], json.dumps(s)) for s in specs]
            )
            self._db.execute("COMMIT")

    def save_host(self, spec: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO hosts (name, spec) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET spec = excluded.spec",
                (spec["name"], json.dumps(spec)),
            )

    def instances(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT data FROM instances ORDER BY id").fetchall()
        return [json.loads(r[0]) for r in rows]

    def save_instance(self, data: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO instances (id, data) VALUES (?, ?) ON CONFLICT(id) DO UPDATE SET data = excluded.data",
                (data["id"], json.dumps(data)),
            )
