"""Start a throw-away local marketplace for a test (or a demo) and make sure it leaves nothing behind.

with running_marketplace(tmp_path, time_scale=0.01) as market:
    provider = market.provider()            # a LocalProvider on it
    market.control.set_host("fast-4090-us", boot_median=1, boot_sigma=0)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests

from dumont.processes import REPO_ROOT
from machines.providers.local.control import MarketplaceControl
from machines.providers.local.provider import LocalProvider


@dataclasses.dataclass
class MarketplaceHandle:
    base_url: str  # the vast API base, what LocalProvider(base_url=...) takes
    url: str  # the server root
    control: MarketplaceControl
    state_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    def provider(self, **options: Any) -> LocalProvider:
        options.setdefault("backoff_initial", 0.05)
        options.setdefault("backoff_max", 0.5)
        return LocalProvider(base_url=self.base_url, **options)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 20) -> None:
        """Destroy every machine, SIGTERM the server, and check that none of its processes is left."""
        if self.process.poll() is None:
            with contextlib.suppress(requests.RequestException, RuntimeError):
                self.control.destroy_all()
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        leftovers = processes_under(self.state_dir)
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if leftovers:
            raise AssertionError(f"marketplace left processes behind: {leftovers}\n{self.log()[-4000:]}")


@contextlib.contextmanager
def running_marketplace(
    tmp_dir: Path | str,
    *,
    time_scale: float = 0.01,
    catalogue: Path | str | None = None,
    seed: int | None = None,
    start_timeout: float = 30,
    env: dict[str, str] | None = None,
) -> Iterator[MarketplaceHandle]:
    state_dir = Path(tmp_dir).resolve() / "marketplace"
    state_dir.mkdir(parents=True, exist_ok=True)
    log_path = state_dir / "server.log"
    command = [
        sys.executable, "-m", "machines.providers.local", "serve",
        "--host", "127.0.0.1", "--port", "0",  # the kernel picks a free port: no race with other tests
        "--state-dir", str(state_dir), "--time-scale", str(time_scale), "--log-level", "INFO",
    ]  # fmt: skip
    if catalogue is not None:
        command += ["--catalogue", str(catalogue)]
    if seed is not None:
        command += ["--seed", str(seed)]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )  # fmt: skip
    handle: MarketplaceHandle | None = None
    try:
        url = _wait_until_serving(process, state_dir, log_path, start_timeout)
        handle = MarketplaceHandle(
            base_url=url + "/api/v0/",
            url=url,
            control=MarketplaceControl(url),
            state_dir=state_dir,
            process=process,
            log_path=log_path,
        )
        yield handle
    finally:
        if handle is not None:
            handle.stop()
        elif process.poll() is None:
            process.kill()
            process.wait()


def _wait_until_serving(
    process: subprocess.Popen[bytes], state_dir: Path, log_path: Path, timeout: float
) -> str:
    deadline = time.monotonic() + timeout
    info_path = state_dir / "server.json"
    delay = 0.02
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"marketplace exited with {process.returncode}:\n{log_path.read_text()[-4000:]}"
            )
        if info_path.exists():
            info = json.loads(info_path.read_text())
            if info["pid"] == process.pid:  # not a stale file from an earlier run in this dir
                with contextlib.suppress(requests.RequestException):
                    if requests.get(info["url"] + "/_market/health/", timeout=2).ok:
                        return info["url"]
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)
    process.kill()
    raise RuntimeError(f"marketplace did not answer within {timeout}s:\n{log_path.read_text()[-4000:]}")


def processes_under(directory: Path) -> list[int]:
    """Pids whose command line, cwd or environment mentions `directory` (sshd configs, sessions, agents)."""
    root = str(Path(directory).resolve())
    mine = os.getpid()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == mine:
            continue
        pid = int(name)
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[-1].split()[0] in ("Z", "X"):
                    continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
            cwd = ""
            with contextlib.suppress(OSError):
                cwd = os.readlink(f"/proc/{pid}/cwd")
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().decode(errors="replace")
            if root in cmdline or cwd == root or cwd.startswith(root + "/") or root in environ:
                found.append(pid)
    return found
