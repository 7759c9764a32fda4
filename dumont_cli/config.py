"""Where the CLI keeps its session (API URL, tokens) and its known_hosts: `DUMONT_CONFIG_DIR`, else
`$XDG_CONFIG_HOME/dumont`, else `~/.config/dumont`. Files holding tokens are born 0600."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path


def default_config_dir() -> Path:
    if os.environ.get("DUMONT_CONFIG_DIR"):
        return Path(os.environ["DUMONT_CONFIG_DIR"]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser() / "dumont"


@dataclasses.dataclass
class Session:
    url: str
    username: str
    refresh: str
    access: str = ""


def write_private(path: Path, text: str) -> None:
    """Write atomically a file only its owner can read (a token must never be readable, even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class ConfigDir:
    def __init__(self, path: Path):
        self.path = path

    @property
    def session_file(self) -> Path:
        return self.path / "session.json"

    @property
    def known_hosts(self) -> Path:
        return self.path / "known_hosts"

    @property
    def ssh_config(self) -> Path:
        return self.path / "ssh_config"

    def load_session(self) -> Session | None:
        try:
            return Session(**json.loads(self.session_file.read_text()))
        except FileNotFoundError:
            return None

    def save_session(self, session: Session) -> None:
        write_private(self.session_file, json.dumps(dataclasses.asdict(session), indent=2) + "\n")

    def forget_session(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.session_file.unlink()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """An exclusive lock across processes: ssh, scp and rsync may each run a proxy at once, and a refresh
        token can be used once only (the server rotates it)."""
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.path / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
