"""Run the real DumontAgent as a subprocess, and a TCP gate to take the control plane "down"."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import agent.daemon.dumont_agent as daemon_module

DAEMON = Path(daemon_module.__file__)


@dataclasses.dataclass
class AgentProcess:
    process: subprocess.Popen
    directory: Path

    @property
    def log(self) -> str:
        path = self.directory / "agent.log"
        return path.read_text() if path.exists() else ""

    def retry_delays(self) -> list[float]:
        return [float(d) for d in re.findall(r"retry in ([0-9.]+)s", self.log)]


@contextlib.contextmanager
def agent_running(directory: Path, *, url: str, instance_id: int, secret: str, env: dict[str, str] | None = None,
                  **config: Any) -> Iterator[AgentProcess]:
    """The daemon, exactly as deployed: one file, a 0600 JSON config, Python in isolated mode (-I:
    no project on sys.path, so an import of Django or of our code would fail)."""
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / "config.json"
    fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"control_plane_url": url, "instance_id": instance_id, "secret": secret, **config}, f)
    with open(directory / "stdio.log", "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-I", str(DAEMON), str(config_path)],
            env={"PATH": os.environ["PATH"], **(env or {})}, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        yield AgentProcess(process, directory)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


class TcpGate:
    """A loopback port that forwards to `target` while open and refuses connections while closed."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._listener: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def open(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _accept(self, listener: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = listener.accept()
                upstream = socket.create_connection(self.target)
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)
