"""The snapshot fast path's engine on the control plane (issue #12): Django-free, like snapshots/restic.py.

It drives agent/daemon/dumont_fastpath.py on a machine over SSH: `scan` (what the workspace holds, which
content-addressed objects make it), `upload` (the objects storage lacks, through presigned PUT URLs) and
`restore` (a manifest, through presigned GET URLs). Presigning, database rows, verification and garbage
collection are the caller's (snapshots/fastpath_services.py).

Everything the machine says is validated before use (`Scan`, `upload`): it is the user's machine. URLs carry
signatures, so they travel only in 0600 files written over SFTP, never in a command line, and no
FastPathError reason ever contains one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import secrets
import shlex
from pathlib import Path

from machines.ssh import CommandResult, SSHError, SSHSession

PROGRAM = Path(__file__).resolve().parent.parent / "agent" / "daemon" / "dumont_fastpath.py"
REMOTE_DIR = "$HOME/.dumont/bin"
REMOTE_PROGRAM = f"{REMOTE_DIR}/dumont_fastpath.py"
REMOTE_STATE = "$HOME/.dumont/fastpath"
WORKSPACE = "${DUMONT_WORKSPACE:-/workspace}"

# the program's layout constants (the manifest's contract: changing one changes every key)
BIG_FILE = 4 << 20
CHUNK = 32 << 20
MANIFEST_VERSION = 1

# what a sane scan stays within
MAX_ENTRIES = 10_000_000
MAX_PATH = 4096
MAX_FILE_SIZE = 1 << 50
MAX_ID = 2**32 - 1
MAX_NS = 2**63 - 1

_KEY = re.compile(r"[0-9a-f]{64}\Z")
_URL = re.compile(r"\b\w+://\S+")
_SIGNATURE = re.compile(r"X-Amz-\w+=\S*", re.IGNORECASE)


class FastPathError(Exception):
    """The fast path failed. `reason` is fit for a user: never a URL (presigned URLs carry signatures)."""

    def __init__(self, reason: str):
        reason = scrub(reason)
        super().__init__(reason)
        self.reason = reason


def scrub(text: str) -> str:
    """Remove anything shaped like a URL or a signature (the program never prints one: defence in depth)."""
    return _SIGNATURE.sub("<signature>", _URL.sub("<url>", text))


@dataclasses.dataclass
class Scan:
    entries: list[dict]
    objects: dict[str, dict]  # key -> {"kind": "chunk" | "group", "size": raw bytes}
    workspace_bytes: int
    files: int
    skipped: int
    seconds: float
    bytes_hashed: int


# ---- the program on the machine --------------------------------------------------------------------------


def program_sha256() -> str:
    return hashlib.sha256(PROGRAM.read_bytes()).hexdigest()


def program_ensure(session: SSHSession) -> bool:
    """Make sure the machine has our dumont_fastpath.py (same sha256) and the tools it needs.

    Copied over SFTP under a temporary name, then renamed (two sessions may install at once).
    Returns True when it had to copy.
    """
    wanted = program_sha256()
    probe = session.run(
        "command -v python3 >/dev/null || { echo 'missing: python3'; exit 0; }; "
        "command -v zstd >/dev/null || { echo 'missing: zstd'; exit 0; }; "
        "tar --version 2>/dev/null | grep -q 'GNU tar' || { echo 'missing: GNU tar'; exit 0; }; "
        f'python3 -c "import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],\'rb\').read()).hexdigest())" '
        f'"{REMOTE_PROGRAM}" 2>/dev/null || true',
        timeout=60,
    )
    found = probe.stdout.strip().splitlines()[-1:] or [""]
    if found[0].startswith("missing: "):
        raise FastPathError(f"the machine lacks {found[0].removeprefix('missing: ')}, which the fast path needs")
    if found[0] == wanted:
        return False
    remote_dir = _remote_dir(session, REMOTE_DIR, "0755")
    temporary = f"{remote_dir}/.dumont_fastpath-{secrets.token_hex(4)}.py"
    try:
        session.upload(PROGRAM, temporary, mode=0o644)
        session.run(["mv", "-f", temporary, f"{remote_dir}/dumont_fastpath.py"], timeout=30, check=True)
    except SSHError as e:
        raise FastPathError(f"copying the fast-path program to the machine failed: {e}") from e
    return True


def _remote_dir(session: SSHSession, directory: str, mode: str) -> str:
    """The absolute path of a directory under $HOME (SFTP does not expand $HOME), created with `mode`."""
    try:
        result = session.run(f'mkdir -p "{directory}" && chmod {mode} "{directory}" && cd "{directory}" && pwd',
                             timeout=30, check=True)
    except SSHError as e:
        raise FastPathError(f"cannot prepare {directory} on the machine: {e}") from e
    return result.stdout.strip()


def _run(session: SSHSession, command: str, arguments: list[str], *, timeout: float) -> dict:
    """Run the program; its JSON document is the last line of stdout."""
    extra = " ".join(shlex.quote(a) for a in arguments)
    shell = f'exec python3 "{REMOTE_PROGRAM}" {command} --workspace "{WORKSPACE}" {extra}'.rstrip()
    try:
        result = session.run(shell, timeout=timeout)
    except SSHError as e:
        raise FastPathError(f"fast-path {command} failed: {e}") from e
    document = _last_json(result)
    if not result.ok:
        error = document.get("error") if isinstance(document, dict) else None
        detail = error if isinstance(error, str) and error else _stderr_tail(result)
        raise FastPathError(f"fast-path {command} failed (exit {result.exit_code}): {detail[:1000]}")
    if not isinstance(document, dict):
        raise FastPathError(f"fast-path {command} printed no result: {_stderr_tail(result)}")
    return document


def _last_json(result: CommandResult):
    lines = result.stdout.strip().splitlines()
    if not lines:
        return None
    try:
        return json.loads(lines[-1], parse_constant=_refuse_constant)
    except ValueError:
        return None


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number")


def _stderr_tail(result: CommandResult) -> str:
    lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
    return lines[-1][:500] if lines else "no output"


def _write_secret_file(session: SSHSession, name: str, document: dict) -> str:
    state = _remote_dir(session, REMOTE_STATE, "0700")
    path = f"{state}/{name}-{secrets.token_hex(6)}.json"
    try:
        session.write_file(path, json.dumps(document, separators=(",", ":")).encode(), mode=0o600)
    except SSHError as e:
        raise FastPathError(f"cannot hand the storage URLs to the machine: {e}") from e
    return path


# ---- the three commands ----------------------------------------------------------------------------------


def scan(session: SSHSession, *, timeout: float) -> Scan:
    """What the workspace holds and which objects make it (only changed files are read again)."""
    document = _run(session, "scan", [], timeout=timeout)
    return parse_scan(document)


def upload(session: SSHSession, urls: dict[str, str], *, timeout: float) -> dict:
    """Upload the objects of the last scan that storage lacks (`urls`: key -> presigned PUT URL).

    Returns {"objects": {key: {"stored_size", "stored_sha256", "encoding"}}, "seconds", "bytes_uploaded"}.
    """
    for key in urls:
        _check_key(key)
    path = _write_secret_file(session, "urls", {"objects": urls})
    document = _run(session, "upload", ["--urls", path], timeout=timeout)
    stored = document.get("objects")
    if not isinstance(stored, dict) or set(stored) != set(urls):
        raise FastPathError("the machine did not report exactly the objects it was asked to upload")
    for key, record in stored.items():
        _check_stored(key, record)
    return {"objects": stored, "seconds": _number(document.get("seconds"), "seconds"),
            "bytes_uploaded": _int(document.get("bytes_uploaded"), "bytes_uploaded", 1 << 60)}


def restore(session: SSHSession, manifest: dict, urls: dict[str, str], *, timeout: float) -> dict:
    """Restore `manifest` into the machine's workspace (`urls`: key -> presigned GET URL of every object).

    Returns the program's figures: {"bytes", "files", "objects", "seconds", "mb_per_second", "phases"}.
    """
    check_manifest(manifest)
    missing = set(manifest["objects"]) - set(urls)
    if missing:
        raise FastPathError(f"no URL for object {sorted(missing)[0]}")
    path = _write_secret_file(session, "plan", {"manifest": manifest, "urls": urls})
    return _run(session, "restore", ["--plan", path], timeout=timeout)


# ---- manifests and names ---------------------------------------------------------------------------------


def manifest_build(scan: Scan, stored: dict[str, dict]) -> dict:
    """The manifest of `scan`, given the stored record of each of its objects (uploaded now or before)."""
    objects = {}
    for key, record in scan.objects.items():
        if key not in stored:
            raise FastPathError(f"object {key} is neither in storage nor uploaded")
        _check_stored(key, stored[key])
        objects[key] = {"kind": record["kind"], "size": record["size"], "stored_size": stored[key]["stored_size"],
                        "stored_sha256": stored[key]["stored_sha256"], "encoding": stored[key]["encoding"]}
    return {"version": MANIFEST_VERSION, "chunk_size": CHUNK, "workspace_bytes": scan.workspace_bytes,
            "files": scan.files, "entries": scan.entries, "objects": objects, "skipped": scan.skipped}


def object_name(prefix: str, key: str) -> str:
    _check_key(key)
    return f"{prefix.strip('/')}/fast/objects/{key[:2]}/{key}"


def manifest_name(prefix: str, manifest_id: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", str(manifest_id)):
        raise FastPathError("not a valid manifest id")
    return f"{prefix.strip('/')}/fast/manifests/{manifest_id}.json"


# ---- validation of what the machine says -----------------------------------------------------------------


def _check_key(key) -> str:
    if not isinstance(key, str) or not _KEY.match(key):
        raise FastPathError(f"not an object key: {str(key)[:80]!r}")
    return key


def _int(value, what: str, high: int, low: int = 0) -> int:
    # bool is an int in Python; a float (NaN, 1e300) is not a size
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise FastPathError(f"the machine reported a bad {what}: {str(value)[:40]}")
    return value


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise FastPathError(f"the machine reported a bad {what}: {str(value)[:40]}")
    return float(value)


def _check_path(path) -> str:
    if not isinstance(path, str) or len(path) > MAX_PATH or "\0" in path:
        raise FastPathError(f"the machine reported a bad path: {str(path)[:200]!r}")
    if path and any(part in ("", ".", "..") for part in path.split("/")):
        raise FastPathError(f"the machine reported an unsafe path: {path[:200]!r}")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        # a name that is not UTF-8 (surrogate escapes) cannot be stored in JSON columns: restic keeps it
        raise FastPathError(f"a file name is not UTF-8: {path.encode('utf-8', 'replace')[:200]!r}") from None
    return path


def _check_stored(key: str, record) -> None:
    _check_key(key)
    if not isinstance(record, dict):
        raise FastPathError(f"object {key} has no stored record")
    _int(record.get("stored_size"), "stored size", 1 << 40)
    _check_key(record.get("stored_sha256"))
    if record.get("encoding") not in ("raw", "zstd"):
        raise FastPathError(f"object {key} has an unknown encoding")


def parse_scan(document: dict) -> Scan:
    """A Scan from the program's output, or FastPathError when anything is out of shape."""
    objects_in = document.get("objects")
    if not isinstance(objects_in, dict) or len(objects_in) > MAX_ENTRIES:
        raise FastPathError("the scan has no object list")
    objects = {}
    for key, record in objects_in.items():
        _check_key(key)
        if not isinstance(record, dict) or record.get("kind") not in ("chunk", "group"):
            raise FastPathError(f"object {key} has an unknown kind")
        high = CHUNK if record["kind"] == "chunk" else MAX_FILE_SIZE
        objects[key] = {"kind": record["kind"], "size": _int(record.get("size"), "object size", high)}
    entries = _check_entries(document.get("entries"), objects)
    files = [e for e in entries if e["type"] == "file"]
    workspace_bytes = _int(document.get("workspace_bytes"), "workspace size", MAX_FILE_SIZE * 1024)
    if workspace_bytes != sum(e["size"] for e in files):
        raise FastPathError("the scan's workspace size is not the sum of its files")
    if _int(document.get("files"), "file count", MAX_ENTRIES) != len(files):
        raise FastPathError("the scan's file count does not match its entries")
    used = {key for e in files for key in e.get("chunks", [])} | {e["group"] for e in files if "group" in e}
    if used != set(objects):
        raise FastPathError("the scan's objects are not exactly those its files use")
    return Scan(entries=entries, objects=objects, workspace_bytes=workspace_bytes, files=len(files),
                skipped=_int(document.get("skipped"), "skipped count", MAX_ENTRIES),
                seconds=_number(document.get("seconds"), "duration"),
                bytes_hashed=_int(document.get("bytes_hashed"), "hashed bytes", MAX_FILE_SIZE * 1024))


def check_manifest(manifest) -> None:
    """A manifest (ours, from the database or storage) that the restore can trust."""
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION \
            or manifest.get("chunk_size") != CHUNK:
        raise FastPathError("not a version 1 fast-path manifest")
    objects = manifest.get("objects")
    if not isinstance(objects, dict):
        raise FastPathError("the manifest has no objects")
    for key, record in objects.items():
        _check_stored(key, record)
        if record.get("kind") not in ("chunk", "group"):
            raise FastPathError(f"object {key} has an unknown kind")
        if record["kind"] == "group" and record["encoding"] != "zstd":
            raise FastPathError(f"group {key} is not zstd")
        _int(record.get("size"), "object size", MAX_FILE_SIZE)
    _check_entries(manifest.get("entries"), objects)


def _check_entries(entries, objects: dict) -> list[dict]:
    if not isinstance(entries, list) or not entries or len(entries) > MAX_ENTRIES:
        raise FastPathError("the scan has no entry list")
    kinds: dict[str, str] = {}
    group_bytes: dict[str, int] = {}
    previous = None
    checked = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise FastPathError("an entry is not an object")
        path = _check_path(entry.get("path"))
        ordered = path.encode("utf-8")
        if previous is not None and ordered <= previous:
            raise FastPathError(f"entries are not sorted by path (or repeat one) at {path[:200]!r}")
        previous = ordered
        kind = entry.get("type")
        if not checked and (path != "" or kind != "dir"):
            raise FastPathError("the first entry must be the workspace root, a directory")
        parent = path.rpartition("/")[0]
        if path and kinds.get(parent) != "dir":
            raise FastPathError(f"{path[:200]!r} is not under a directory of the scan")
        base = {"path": path, "type": kind, "uid": _int(entry.get("uid"), "uid", MAX_ID),
                "gid": _int(entry.get("gid"), "gid", MAX_ID),
                "mtime_ns": _int(entry.get("mtime_ns"), "mtime", MAX_NS, -MAX_NS)}
        if kind == "dir":
            base["mode"] = _int(entry.get("mode"), "mode", 0o7777)
        elif kind == "symlink":
            target = entry.get("target")
            if not isinstance(target, str) or not target or len(target) > MAX_PATH or "\0" in target:
                raise FastPathError(f"{path[:200]!r} has a bad symlink target")
            _check_path_text(target)
            base["target"] = target
        elif kind == "file":
            base["mode"] = _int(entry.get("mode"), "mode", 0o7777)
            size = base["size"] = _int(entry.get("size"), "file size", MAX_FILE_SIZE)
            if size >= BIG_FILE:
                chunks = entry.get("chunks")
                lengths = [min(CHUNK, size - offset) for offset in range(0, size, CHUNK)]
                if not isinstance(chunks, list) or len(chunks) != len(lengths) or "group" in entry:
                    raise FastPathError(f"{path[:200]!r} has a bad chunk list")
                for key, length in zip(chunks, lengths, strict=True):
                    record = objects.get(_check_key(key))
                    if record is None or record["kind"] != "chunk" or record["size"] != length:
                        raise FastPathError(f"{path[:200]!r} names a missing or inconsistent chunk")
                base["chunks"] = list(chunks)
            else:
                group = _check_key(entry.get("group"))
                if objects.get(group, {}).get("kind") != "group" or "chunks" in entry:
                    raise FastPathError(f"{path[:200]!r} names a missing group")
                base["group"] = group
                base["sha256"] = _check_key(entry.get("sha256"))
                group_bytes[group] = group_bytes.get(group, 0) + size
        else:
            raise FastPathError(f"{path[:200]!r} has an unknown type")
        kinds[path] = kind
        checked.append(base)
    for key, record in objects.items():
        if record["kind"] == "group" and group_bytes.get(key) != record["size"]:
            raise FastPathError(f"group {key} does not hold the bytes of its members")
    return checked


def _check_path_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise FastPathError("a symlink target is not UTF-8") from None
