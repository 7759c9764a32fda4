"""Real Celery worker / beat / web server subprocesses, for end-to-end tests and benchmarks.

They run against the current database and Redis (in tests: the xdist worker's own), and are always
stopped (whole process group) when the block exits, also when the caller failed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from django.conf import settings
from django.db import connection

REPO_ROOT = Path(__file__).resolve().parent.parent


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment a child process needs to share this test's database and Redis."""
    db = connection.settings_dict
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_XDIST_WORKER"}
    env.update(
        DJANGO_SETTINGS_MODULE="dumont.settings",
        DATABASE_URL=f"postgres://{db['USER']}:{db['PASSWORD'] or ''}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}",
        REDIS_URL=settings.REDIS_URL,
        REDIS_KEY_PREFIX=settings.REDIS_KEY_PREFIX,
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def wait_until(predicate: Callable[[], object], *, timeout: float, interval: float = 0.2, what: str = "condition"):
    """Poll `predicate` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def celery_process(kind: str, log_dir: Path, *, args: tuple[str, ...] = (), ready_text: str, env: dict | None = None,
                   timeout: float = 90, log_name: str | None = None) -> Iterator[subprocess.Popen]:
    log_path = log_dir / f"celery-{log_name or kind}.log"
    command = [sys.executable, "-m", "celery", "-A", "dumont", kind, "--loglevel=INFO", *args]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env or subprocess_env(), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(
            lambda: process.poll() is not None or ready_text in log_path.read_text(errors="replace"),
            timeout=timeout, what=f"celery {kind} to start",
        )
        if process.poll() is not None:
            raise RuntimeError(f"celery {kind} exited early:\n{log_path.read_text(errors='replace')[-3000:]}")
        yield process
    finally:
        stop_process_group(process)


def stop_process_group(process: subprocess.Popen, *, grace: float = 10) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    # children of the group (prefork pool) too, even if the parent already exited
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)


def celery_worker(log_dir: Path, *, concurrency: int = 2, env: dict | None = None,
                  queues: tuple[str, ...] | None = None, name: str = "worker"):
    """A worker consuming `queues` (default: every queue of dumont.celery, so one worker runs all work)."""
    from dumont.celery import QUEUES

    return celery_process(
        "worker", log_dir, env=env, ready_text="ready.", log_name=name,
        args=("--pool=prefork", f"--concurrency={concurrency}", "--without-gossip", "--without-mingle",
              "--without-heartbeat", f"--queues={','.join(queues or QUEUES)}",
              f"--hostname={name}-{os.getpid()}@%h"),
    )


def celery_beat(log_dir: Path, *, env: dict | None = None):
    return celery_process(
        "beat", log_dir, env=env, ready_text="beat: Starting",
        args=("--scheduler=django_celery_beat.schedulers:DatabaseScheduler", "--pidfile=", "--max-interval=1"),
    )


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def web_server(log_dir: Path, *, env: dict | None = None, port: int | None = None, ingest: bool = False,
               timeout: float = 60) -> Iterator[str]:
    """A production web server (gunicorn) on a loopback port (a free one by default); yields its URL.
    `ingest`: the heartbeat ingest tier (uvicorn workers, dumont.asgi) instead of the API's (dumont.wsgi)."""
    import urllib.request

    port = port or free_port()
    log_path = log_dir / ("ingest.log" if ingest else "web.log")
    server = (["dumont.asgi:application", "--worker-class", "uvicorn.workers.UvicornWorker"] if ingest
              else ["dumont.wsgi:application", "--threads", "8"])
    command = [sys.executable, "-m", "gunicorn", *server, "--bind", f"127.0.0.1:{port}", "--workers", "1",
               "--access-logfile", "-"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env or subprocess_env(), stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"gunicorn exited early:\n{log_path.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/api/v1/health", timeout=2) as response:  # noqa: S310 (loopback)
                return response.status == 200
        except OSError:
            return False

    try:
        wait_until(answers, timeout=timeout, what="gunicorn to answer")
        yield url
    finally:
        stop_process_group(process)
