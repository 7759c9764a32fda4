#!/usr/bin/env python3
"""dumont_fastpath: the machine side of the snapshot fast path (issue #12, notes/FASTPATH_SPEC.md).

    python3 dumont_fastpath.py scan    --workspace W
    python3 dumont_fastpath.py upload  --workspace W --urls FILE
    python3 dumont_fastpath.py restore --workspace W --plan FILE

Standard library only (Python >= 3.8) plus the `zstd` and GNU `tar` commands: it runs on whatever image the
user chose; the control plane copies this one file over SFTP. It never holds storage keys: the control plane
hands it one short-lived presigned URL per object, in a 0600 file it deletes as soon as it has read it. URLs
carry signatures, so no message of this program ever contains one.

Output: one JSON document on stdout at the end; on failure exit 1 with {"error": "..."} (and the same
message on stderr).

Speed is the point of the restore: per byte it does one recv into a reused buffer, one sha256 update (the
GIL is released) and one pwrite (or one pipe write to zstd / tar); no staging file, no fsync.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import hashlib
import http.client
import json
import os
import queue
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

VERSION = 1
BIG_FILE = 4 << 20  # files at least this big are cut into chunks; smaller ones are packed into groups
CHUNK = 32 << 20
GROUP_MIN = 8 << 20
GROUP_MAX = 32 << 20
BOUNDARY_MODULUS = 64  # content-defined group boundaries: an inserted file moves only its own group's
PROBE_BYTES = 1 << 20  # compressibility probe: zstd -1 of a chunk's first MiB
PROBE_RATIO = 0.9
HASH_READ = 8 << 20
IO_BUFFER = 1 << 20  # each byte is received, hashed, then written: a buffer that stays in the CPU's cache
SMALL_BATCH_BYTES = 4 << 20  # small files are hashed in batches: one thread-pool task per batch
HASH_THREADS = 4
UPLOAD_THREADS = 8
RESTORE_THREADS = 8
RETRIES = 3
HTTP_TIMEOUT = 120
PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
TAR_PAX = "exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime"  # deterministic headers, no atime/ctime
HEX = frozenset("0123456789abcdef")
TRACE = bool(os.environ.get("DUMONT_FASTPATH_TRACE"))  # one stderr line per restored object


class Failure(Exception):
    """A reason fit for the user (never a URL)."""


def state_dir() -> str:
    path = os.path.join(os.path.expanduser("~"), ".dumont", "fastpath")
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def is_key(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and HEX.issuperset(value)


def canonical(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def write_json(path: str, value) -> None:
    temporary = f"{path}.tmp{os.getpid()}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(canonical(value))
    os.replace(temporary, path)


def read_json(path: str, default=None):
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        return default
    except ValueError:
        return default  # a torn cache is no cache


def read_and_delete(path: str):
    """The control plane's 0600 file of URLs: read once, deleted at once (it holds signatures)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise Failure(f"cannot read {os.path.basename(path)}: {e.strerror}") from None
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
    try:
        return json.loads(data)
    except ValueError:
        raise Failure(f"{os.path.basename(path)} is not JSON") from None


def join(workspace: str, rel: str) -> str:
    return os.path.join(workspace, rel) if rel else workspace


def sort_key(rel: str) -> bytes:
    return os.fsencode(rel)


def is_boundary(rel: str) -> bool:
    return int(hashlib.sha256(os.fsencode(rel)).hexdigest()[:8], 16) % BOUNDARY_MODULUS == 0


def chunk_ranges(size: int):
    return [(offset, min(CHUNK, size - offset)) for offset in range(0, size, CHUNK)]


class Buffers(threading.local):
    """One reusable buffer per thread: nothing is allocated per object."""

    def get(self, size: int) -> memoryview:
        view = getattr(self, "view", None)
        if view is None or len(view) < size:
            self.view = view = memoryview(bytearray(size))
        return view


_buffers = Buffers()


def read_exactly(fd: int, view: memoryview, offset: int) -> int:
    """Fill `view` from `offset`; returns how much the file really had there."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


# ---- scan -------------------------------------------------------------------------------------------------


def walk(workspace: str):
    """Every entry under the workspace (the root as ""), lstat'ed, sorted by the bytes of its path."""
    found = [("", os.stat(workspace))]  # the workspace itself may be a symlink (/workspace -> /data/ws)
    pending = [("", workspace)]
    while pending:
        rel, full = pending.pop()
        try:
            with os.scandir(full) as listing:
                for entry in listing:
                    child = f"{rel}/{entry.name}" if rel else entry.name
                    try:
                        info = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # removed while we walked
                    found.append((child, info))
                    if stat.S_ISDIR(info.st_mode):
                        pending.append((child, entry.path))
        except FileNotFoundError:
            continue
        except PermissionError:
            raise Failure(f"cannot read the directory {rel or '.'}: permission denied") from None
    found.sort(key=lambda item: sort_key(item[0]))
    return found


def hash_chunk(workspace: str, rel: str, offset: int, length: int) -> str:
    view = _buffers.get(HASH_READ)
    digest = hashlib.sha256()
    fd = os.open(join(workspace, rel), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        done = 0
        while done < length:
            piece = view[: min(len(view), length - done)]
            n = read_exactly(fd, piece, offset + done)
            digest.update(piece[:n])
            if n < len(piece):
                raise Failure(f"{rel} shrank while it was read")
            done += n
    finally:
        os.close(fd)
    return digest.hexdigest()


def hash_small_files(workspace: str, batch) -> list:
    view = _buffers.get(HASH_READ)
    digests = []
    for rel, size in batch:
        fd = os.open(join(workspace, rel), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            n = read_exactly(fd, view[:size], 0)
        finally:
            os.close(fd)
        if n < size:
            raise Failure(f"{rel} shrank while it was read")
        digests.append(hashlib.sha256(view[:size]).hexdigest())
    return digests


def command_scan(args) -> dict:
    started = time.monotonic()
    workspace = args.workspace
    state = state_dir()
    if not os.path.isdir(workspace):
        raise Failure("the workspace does not exist")
    cache = read_json(os.path.join(state, "cache.json"), {}) or {}
    cached = cache.get("files", {}) if cache.get("workspace") == workspace else {}

    entries, files, skipped = [], [], 0
    for rel, info in walk(workspace):
        mode = info.st_mode
        base = {"path": rel, "uid": info.st_uid, "gid": info.st_gid, "mtime_ns": info.st_mtime_ns}
        if stat.S_ISDIR(mode):
            entries.append({**base, "type": "dir", "mode": stat.S_IMODE(mode)})
        elif stat.S_ISLNK(mode):
            entries.append({**base, "type": "symlink", "target": os.readlink(join(workspace, rel))})
        elif stat.S_ISREG(mode):
            entry = {**base, "type": "file", "mode": stat.S_IMODE(mode), "size": info.st_size}
            entries.append(entry)
            files.append((entry, info))
        else:
            skipped += 1  # fifo, socket, device

    # what must be read again: new files and files whose inode, size, mtime or ctime changed
    contents: dict = {}
    chunk_jobs, small_jobs = [], []
    for entry, info in files:
        rel, size = entry["path"], info.st_size
        seen = cached.get(rel)
        big = size >= BIG_FILE
        if (isinstance(seen, list) and len(seen) == 5
                and seen[:4] == [info.st_ino, size, info.st_mtime_ns, info.st_ctime_ns]
                and (isinstance(seen[4], list) if big else is_key(seen[4]))
                and (not big or len(seen[4]) == len(chunk_ranges(size)))):
            contents[rel] = seen[4]
        elif big:
            contents[rel] = [None] * len(chunk_ranges(size))
            chunk_jobs.extend((rel, i, offset, length) for i, (offset, length) in enumerate(chunk_ranges(size)))
        else:
            small_jobs.append((rel, size))

    with ThreadPoolExecutor(HASH_THREADS) as pool:
        chunk_futures = [(rel, i, pool.submit(hash_chunk, workspace, rel, offset, length))
                         for rel, i, offset, length in chunk_jobs]
        batches, batch, batch_bytes = [], [], 0
        for job in small_jobs:
            batch.append(job)
            batch_bytes += job[1]
            if batch_bytes >= SMALL_BATCH_BYTES or len(batch) >= 512:
                batches.append(batch)
                batch, batch_bytes = [], 0
        if batch:
            batches.append(batch)
        small_futures = [(batch, pool.submit(hash_small_files, workspace, batch)) for batch in batches]
        for rel, i, future in chunk_futures:
            contents[rel][i] = future.result()
        for batch, future in small_futures:
            for (rel, _), digest in zip(batch, future.result()):  # noqa: B905 (Python 3.8)
                contents[rel] = digest
    bytes_hashed = sum(length for _, _, _, length in chunk_jobs) + sum(size for _, size in small_jobs)

    # the objects: chunks of big files, groups of small ones
    objects, plan, new_cache = {}, {}, {}
    small = []
    for entry, info in files:
        rel, size = entry["path"], entry["size"]
        content = contents[rel]
        new_cache[rel] = [info.st_ino, size, info.st_mtime_ns, info.st_ctime_ns, content]
        if size >= BIG_FILE:
            entry["chunks"] = content
            for key, (offset, length) in zip(content, chunk_ranges(size)):  # noqa: B905 (Python 3.8)
                if key not in objects:
                    objects[key] = {"kind": "chunk", "size": length}
                    plan[key] = {"kind": "chunk", "path": rel, "offset": offset, "length": length,
                                 "stat": [info.st_ino, size, info.st_mtime_ns, info.st_ctime_ns]}
        else:
            entry["sha256"] = content
            small.append((entry, info))

    group, group_bytes = [], 0
    for index, (entry, info) in enumerate(small):
        group.append((entry, info))
        group_bytes += entry["size"]
        following = small[index + 1][0]["path"] if index + 1 < len(small) else None
        if following is None or group_bytes >= GROUP_MAX or (group_bytes >= GROUP_MIN and is_boundary(following)):
            members = [[e["path"], e["mode"], e["uid"], e["gid"], e["mtime_ns"], e["size"], e["sha256"]]
                       for e, _ in group]
            key = hashlib.sha256(canonical({"v": 1, "members": members})).hexdigest()
            for e, _ in group:
                e["group"] = key
            objects[key] = {"kind": "group", "size": group_bytes}
            plan[key] = {"kind": "group", "size": group_bytes, "members": [
                [e["path"], i.st_ino, i.st_size, i.st_mtime_ns, i.st_ctime_ns] for e, i in group]}
            group, group_bytes = [], 0

    write_json(os.path.join(state, "scan.json"), {"workspace": workspace, "objects": plan})
    write_json(os.path.join(state, "cache.json.new"), {"workspace": workspace, "files": new_cache})
    return {"entries": entries, "objects": objects, "workspace_bytes": sum(e["size"] for e, _ in files),
            "files": len(files), "skipped": skipped, "seconds": round(time.monotonic() - started, 3),
            "bytes_hashed": bytes_hashed}


# ---- HTTP -------------------------------------------------------------------------------------------------


class Connections:
    """One keep-alive connection per storage host, per worker thread."""

    def __init__(self):
        self.open = {}

    def get(self, url: str):
        parts = urlsplit(url)
        where = (parts.scheme, parts.netloc)
        conn = self.open.get(where)
        if conn is None:
            if parts.scheme == "https":
                conn = http.client.HTTPSConnection(parts.netloc, timeout=HTTP_TIMEOUT)
            elif parts.scheme == "http":
                conn = http.client.HTTPConnection(parts.netloc, timeout=HTTP_TIMEOUT)
            else:
                raise Failure("a storage URL is neither http nor https")
            self.open[where] = conn
        target = parts.path + ("?" + parts.query if parts.query else "")
        return conn, target

    def drop(self, url: str) -> None:
        parts = urlsplit(url)
        conn = self.open.pop((parts.scheme, parts.netloc), None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        for conn in self.open.values():
            conn.close()
        self.open.clear()


class Retry(Exception):
    """A connection error or a 5xx: worth another try."""


def storage_error(status: int, body: bytes) -> str:
    """'HTTP 403 AccessDenied: Request has expired' from an S3 error body (no URL: only Code and Message)."""
    text = body.decode("utf-8", "replace")
    parts = []
    for tag in ("Code", "Message"):
        start, end = text.find(f"<{tag}>"), text.find(f"</{tag}>")
        if 0 <= start < end:
            value = text[start + len(tag) + 2:end].strip()
            if "://" not in value and "X-Amz-" not in value:
                parts.append(value[:200])
    return f"HTTP {status}" + (" " + ": ".join(parts) if parts else "")


def with_retries(what: str, attempt):
    delay = 0.5
    for tries in range(RETRIES + 1):
        try:
            return attempt()
        except Retry as e:
            if tries == RETRIES:
                raise Failure(f"{what}: {e} (after {RETRIES} retries)") from None
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def put(connections: Connections, url: str, body, what: str) -> None:
    def attempt():
        conn, target = connections.get(url)
        try:
            conn.putrequest("PUT", target, skip_accept_encoding=True)
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders()
            conn.send(body)
            response = conn.getresponse()
            answer = response.read()
        except (OSError, http.client.HTTPException) as e:
            connections.drop(url)
            raise Retry(f"connection error ({type(e).__name__})") from None
        if response.status >= 500:
            raise Retry(storage_error(response.status, answer))
        if response.status not in (200, 201, 204):
            raise Failure(f"{what}: storage refused the upload ({storage_error(response.status, answer)})")

    with_retries(what, attempt)


# ---- upload -----------------------------------------------------------------------------------------------


def zstd_compress(data) -> bytes:
    process = subprocess.Popen(["zstd", "-1", "-q", "-c"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL)
    writer = threading.Thread(target=_feed, args=(process.stdin, data))
    writer.start()
    out = process.stdout.read()
    writer.join()
    if process.wait() != 0:
        raise Failure("zstd failed to compress")
    return out


def _feed(pipe, data) -> None:
    try:
        pipe.write(data)
    except BrokenPipeError:
        pass
    finally:
        try:
            pipe.close()
        except BrokenPipeError:
            pass


def build_chunk(workspace: str, key: str, item: dict):
    rel, offset, length = item["path"], item["offset"], item["length"]
    view = _buffers.get(CHUNK)[:length]
    try:
        fd = os.open(join(workspace, rel), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        raise Failure(f"{rel} changed since the scan (it cannot be opened)") from None
    try:
        n = read_exactly(fd, view, offset)
    finally:
        os.close(fd)
    # the key names the content: never store other bytes under it
    if n < length or hashlib.sha256(view).hexdigest() != key:
        raise Failure(f"{rel} changed since the scan")
    probe = view[:PROBE_BYTES]
    if len(zstd_compress(probe)) > PROBE_RATIO * len(probe):
        return view, "raw"
    return zstd_compress(view), "zstd"


def build_group(workspace: str, key: str, item: dict):
    members = item["members"]
    names = b"".join(os.fsencode(m[0]) + b"\0" for m in members)
    tar = subprocess.Popen(
        ["tar", "-c", "-f", "-", "--format=posix", "--numeric-owner", "--no-recursion", f"--pax-option={TAR_PAX}",
         "-C", workspace, "--null", "--verbatim-files-from", "-T", "-"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=tempfile.TemporaryFile())
    zstd = subprocess.Popen(["zstd", "-1", "-q", "-c"], stdin=tar.stdout, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    tar.stdout.close()
    writer = threading.Thread(target=_feed, args=(tar.stdin, names))
    writer.start()
    out = zstd.stdout.read()
    writer.join()
    tar_status, zstd_status = tar.wait(), zstd.wait()
    # a member changed since the scan (or while tar read it): the group's key would lie
    for rel, ino, size, mtime_ns, ctime_ns in members:
        try:
            info = os.lstat(join(workspace, rel))
        except OSError:
            raise Failure(f"{rel} changed since the scan (it is gone)") from None
        if [info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns] != [ino, size, mtime_ns, ctime_ns]:
            raise Failure(f"{rel} changed since the scan")
    if tar_status != 0 or zstd_status != 0:
        raise Failure(f"packing group {key[:12]} failed (tar exit {tar_status}, zstd exit {zstd_status})")
    return out, "zstd"


def command_upload(args) -> dict:
    started = time.monotonic()
    state = state_dir()
    urls = read_and_delete(args.urls).get("objects")
    scanned = read_json(os.path.join(state, "scan.json"))
    if not isinstance(urls, dict):
        raise Failure("the URL file has no objects")
    if not scanned or scanned.get("workspace") != args.workspace:
        raise Failure("no scan of this workspace: run scan first")
    plan = scanned["objects"]
    unknown = [key for key in urls if key not in plan]
    if unknown:
        raise Failure(f"object {unknown[0]} is not in the last scan")
    jobs: queue.Queue = queue.Queue()
    for key in sorted(urls, key=lambda k: -(plan[k].get("length") or plan[k].get("size") or 0)):
        jobs.put(key)
    results, errors = {}, []
    uploaded = [0]
    lock = threading.Lock()

    def worker():
        connections = Connections()
        try:
            while not errors:
                try:
                    key = jobs.get_nowait()
                except queue.Empty:
                    return
                item = plan[key]
                try:
                    if item["kind"] == "chunk":
                        body, encoding = build_chunk(args.workspace, key, item)
                    else:
                        body, encoding = build_group(args.workspace, key, item)
                    digest = hashlib.sha256(body).hexdigest()
                    put(connections, urls[key], body, f"object {key}")
                except Failure as e:
                    errors.append(str(e))
                    return
                except Exception as e:  # noqa: BLE001 (any surprise fails the upload with a reason)
                    errors.append(f"object {key}: {type(e).__name__}: {e}")
                    return
                with lock:
                    results[key] = {"stored_size": len(body), "stored_sha256": digest, "encoding": encoding}
                    uploaded[0] += len(body)
        finally:
            connections.close()

    threads = [threading.Thread(target=worker) for _ in range(min(UPLOAD_THREADS, max(len(urls), 1)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise Failure(errors[0])
    # only now may the next scan trust what this one read
    new_cache = os.path.join(state, "cache.json.new")
    if os.path.exists(new_cache):
        os.replace(new_cache, os.path.join(state, "cache.json"))
    return {"objects": results, "seconds": round(time.monotonic() - started, 3), "bytes_uploaded": uploaded[0]}


# ---- restore ----------------------------------------------------------------------------------------------


def _int(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def valid_path(rel) -> bool:
    if not isinstance(rel, str) or "\0" in rel or len(rel) > 4096:
        return False
    return rel == "" or not any(part in ("", ".", "..") for part in rel.split("/"))


def check_manifest(manifest, urls) -> list:
    """Refuse the whole manifest (before anything is written) when one entry is unsafe or inconsistent."""
    if not isinstance(manifest, dict) or manifest.get("version") != VERSION:
        raise Failure("unsupported manifest version")
    if manifest.get("chunk_size") != CHUNK:
        raise Failure("unsupported chunk size")
    entries, objects = manifest.get("entries"), manifest.get("objects")
    if not isinstance(entries, list) or not isinstance(objects, dict) or not isinstance(urls, dict):
        raise Failure("the manifest has no entries or objects")
    kinds = {}
    for entry in entries:
        if not isinstance(entry, dict):
            raise Failure("a manifest entry is not an object")
        rel = entry.get("path")
        if not valid_path(rel):
            raise Failure(f"the manifest has an unsafe path: {str(rel)[:200]!r}")
        if rel in kinds:
            raise Failure(f"the manifest lists {rel!r} twice")
        kind = entry.get("type")
        if kind not in ("dir", "file", "symlink"):
            raise Failure(f"{rel!r} has an unknown type")
        if rel == "" and kind != "dir":
            raise Failure("the workspace root must be a directory")
        for field in ("uid", "gid"):
            if not _int(entry.get(field), 0, 2**32 - 1):
                raise Failure(f"{rel!r} has a bad {field}")
        if not _int(entry.get("mtime_ns"), -(2**63), 2**63 - 1):
            raise Failure(f"{rel!r} has a bad mtime")
        if kind != "symlink" and not _int(entry.get("mode"), 0, 0o7777):
            raise Failure(f"{rel!r} has a bad mode")
        if kind == "symlink":
            target = entry.get("target")
            if not isinstance(target, str) or not target or "\0" in target:
                raise Failure(f"{rel!r} has a bad symlink target")
        if kind == "file":
            size = entry.get("size")
            if not _int(size, 0, 2**50):
                raise Failure(f"{rel!r} has a bad size")
            chunks = entry.get("chunks")
            if chunks is not None:
                if not isinstance(chunks, list) or len(chunks) != len(chunk_ranges(size)):
                    raise Failure(f"{rel!r} has a bad chunk list")
                for key, (_, length) in zip(chunks, chunk_ranges(size)):  # noqa: B905 (Python 3.8)
                    record = objects.get(key)
                    if not is_key(key) or not isinstance(record, dict) or record.get("size") != length \
                            or record.get("kind") != "chunk":
                        raise Failure(f"{rel!r} names a missing or inconsistent chunk")
            elif not is_key(entry.get("sha256")) or not isinstance(objects.get(entry.get("group")), dict) \
                    or objects[entry["group"]].get("kind") != "group":
                raise Failure(f"{rel!r} names a missing group")
        parent = rel.rpartition("/")[0]
        if rel and kinds.get(parent) != "dir":
            # a file under a symlink would be written wherever the link points
            raise Failure(f"{rel!r} is not under a directory of the manifest")
        kinds[rel] = kind
    for key, record in objects.items():
        if not is_key(key) or not isinstance(record, dict):
            raise Failure("the manifest has a bad object key")
        if record.get("kind") not in ("chunk", "group") or record.get("encoding") not in ("raw", "zstd"):
            raise Failure(f"object {key} has a bad kind or encoding")
        if record.get("kind") == "group" and record.get("encoding") != "zstd":
            raise Failure(f"object {key} has a bad encoding")
        if not is_key(record.get("stored_sha256")) or not _int(record.get("stored_size"), 0, 2**40):
            raise Failure(f"object {key} has a bad stored size or digest")
        if not isinstance(urls.get(key), str):
            raise Failure(f"no URL for object {key}")
    return entries


def remove_any(path: str) -> None:
    """Whatever stands at path (file, symlink, directory tree), without following a symlink."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(info.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


class Sink:
    """Where one object's body goes; `start` is called again for a retried GET."""

    def start(self) -> None: ...

    def write(self, piece: memoryview) -> None: ...

    def finish(self) -> None: ...

    def abort(self) -> None: ...


class RawChunk(Sink):
    def __init__(self, targets):
        self.targets = targets  # [(path, offset)]: identical chunks of several places are fetched once
        self.fds = []

    def start(self) -> None:
        self.abort()
        self.fds = [(os.open(path, os.O_WRONLY | os.O_CLOEXEC), offset) for path, offset in self.targets]
        self.position = 0

    def write(self, piece: memoryview) -> None:
        for fd, offset in self.fds:
            done = 0
            while done < len(piece):
                done += os.pwrite(fd, piece[done:], offset + self.position + done)
        self.position += len(piece)

    def finish(self) -> None:
        self.abort()

    def abort(self) -> None:
        for fd, _ in self.fds:
            os.close(fd)
        self.fds = []


class PipeSink(Sink):
    """A child process fed through a pipe (zstd -d into the file, or zstd -d | tar -x)."""

    what = ""

    def __init__(self):
        self.processes = []
        self.stdin = None

    def spawn(self) -> list:
        raise NotImplementedError

    def start(self) -> None:
        self.abort()
        self.errors = tempfile.TemporaryFile()  # read only on failure: a pipe could fill up and block
        self.processes = self.spawn()
        self.stdin = self.processes[0].stdin
        try:
            fcntl.fcntl(self.stdin.fileno(), F_SETPIPE_SZ, PIPE_SIZE)  # fewer wake-ups per MiB
        except OSError:
            pass

    def write(self, piece: memoryview) -> None:
        fd = self.stdin.fileno()
        done = 0
        try:
            while done < len(piece):
                done += os.write(fd, piece[done:])
        except BrokenPipeError:
            raise Failure(f"{self.what} stopped reading: {self.stderr_tail()}") from None

    def finish(self) -> None:
        """All the body was written: the child finishes on its own (`complete`, in the background)."""
        try:
            self.stdin.close()
        except BrokenPipeError:
            pass
        self.stdin = None

    def complete(self) -> None:
        statuses = [process.wait() for process in self.processes]
        if any(statuses):
            raise Failure(f"{self.what} failed (exit {max(statuses)}): {self.stderr_tail()}")

    def stderr_tail(self) -> str:
        self.errors.seek(0)
        return self.errors.read()[-300:].decode("utf-8", "replace").strip() or "no message"

    def abort(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()
        if self.stdin is not None:
            try:
                self.stdin.close()
            except OSError:
                pass
        self.processes, self.stdin = [], None
        if getattr(self, "errors", None) is not None:
            self.errors.close()
            self.errors = None


class ZstdChunk(PipeSink):
    what = "zstd"

    def __init__(self, targets, size: int):
        super().__init__()
        self.targets, self.size = targets, size
        self.fd = None

    def spawn(self) -> list:
        path, offset = self.targets[0]
        if self.fd is not None:
            os.close(self.fd)
        self.fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        os.lseek(self.fd, offset, os.SEEK_SET)  # zstd writes its output from here on
        return [subprocess.Popen(["zstd", "-d", "-q", "-c"], stdin=subprocess.PIPE, stdout=self.fd,
                                 stderr=self.errors)]

    def complete(self) -> None:
        super().complete()
        path, offset = self.targets[0]
        written = os.lseek(self.fd, 0, os.SEEK_CUR) - offset
        if written != self.size:
            raise Failure(f"zstd wrote {written} bytes instead of {self.size}")
        for other, other_offset in self.targets[1:]:
            fd = os.open(other, os.O_WRONLY | os.O_CLOEXEC)
            try:
                copy_range(self.fd, offset, fd, other_offset, self.size)
            finally:
                os.close(fd)
        os.close(self.fd)
        self.fd = None

    def abort(self) -> None:
        super().abort()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def copy_range(source: int, source_offset: int, target: int, target_offset: int, size: int) -> None:
    done = 0
    while done < size:
        n = os.copy_file_range(source, target, size - done, source_offset + done, target_offset + done)
        if n == 0:
            raise Failure("a duplicate chunk could not be copied")
        done += n


class GroupArchive(PipeSink):
    what = "tar"

    def __init__(self, workspace: str):
        super().__init__()
        self.workspace = workspace

    def spawn(self) -> list:
        owner = ["--same-owner"] if os.geteuid() == 0 else ["--no-same-owner"]
        zstd = subprocess.Popen(["zstd", "-d", "-q", "-c"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=self.errors)
        tar = subprocess.Popen(["tar", "-x", "-f", "-", "-C", self.workspace, "--numeric-owner", "-p", *owner],
                               stdin=zstd.stdout, stdout=subprocess.DEVNULL, stderr=self.errors)
        zstd.stdout.close()
        return [zstd, tar]


class Background:
    """Waits for the children (zstd, tar) of bodies already received, so that their worker fetches the next
    object meanwhile: creating a group's thousands of files takes longer than downloading it."""

    def __init__(self, limit: int, errors: list):
        self.slots = threading.BoundedSemaphore(limit)  # children in flight, at most
        self.errors = errors
        self.threads = []

    def hand_over(self, key: str, sink: PipeSink) -> None:
        thread = threading.Thread(target=self._complete, args=(key, sink))
        thread.start()
        self.threads.append(thread)

    def _complete(self, key: str, sink: PipeSink) -> None:
        try:
            sink.complete()
        except Failure as e:
            self.errors.append(f"object {key}: {e}")
        except Exception as e:  # noqa: BLE001 (any surprise fails the restore with a reason)
            self.errors.append(f"object {key}: {type(e).__name__}: {e}")
        finally:
            sink.abort()
            self.slots.release()

    def join(self) -> None:
        for thread in self.threads:
            thread.join()


def fetch(connections: Connections, url: str, key: str, record: dict, sink: Sink, check_key: bool) -> None:
    """GET one object into `sink`, hashing the stored bytes as they arrive."""
    view = _buffers.get(IO_BUFFER)
    expected = record["stored_size"]
    what = f"object {key}"

    def attempt():
        conn, target = connections.get(url)
        try:
            conn.putrequest("GET", target, skip_accept_encoding=True)
            conn.endheaders()
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            connections.drop(url)
            raise Retry(f"connection error ({type(e).__name__})") from None
        if response.status != 200:
            try:
                answer = response.read(1 << 16)
            except (OSError, http.client.HTTPException):
                answer = b""
            connections.drop(url)
            if response.status >= 500:
                raise Retry(storage_error(response.status, answer))
            raise Failure(f"{what}: storage refused the download ({storage_error(response.status, answer)})")
        if response.length != expected:
            connections.drop(url)
            raise Failure(f"{what} is {response.length} bytes in storage, the manifest says {expected}")
        digest = hashlib.sha256()
        sink.start()
        received = 0
        try:
            while received < expected:
                n = response.readinto(view)
                if n == 0:
                    raise http.client.IncompleteRead(b"")
                piece = view[:n]
                digest.update(piece)
                sink.write(piece)
                received += n
        except (OSError, http.client.HTTPException) as e:
            sink.abort()
            connections.drop(url)
            raise Retry(f"connection error ({type(e).__name__}) after {received} bytes") from None
        if digest.hexdigest() != record["stored_sha256"] or (check_key and digest.hexdigest() != key):
            sink.abort()
            raise Failure(f"{what} is corrupt in storage (its sha256 does not match)")

    with_retries(what, attempt)


def command_restore(args) -> dict:
    started = time.monotonic()
    workspace = args.workspace
    plan = read_and_delete(args.plan)
    if not isinstance(plan, dict):
        raise Failure("the plan is not an object")
    manifest, urls = plan.get("manifest"), plan.get("urls")
    entries = check_manifest(manifest, urls)
    objects = manifest["objects"]
    as_root = os.geteuid() == 0

    # directories first (0700 while restoring: writable whatever their final mode), then the big files
    os.makedirs(workspace, exist_ok=True)
    fresh = set()  # directories this restore created: nothing stands in them yet
    big_files, total_bytes = [], 0
    for entry in entries:
        rel, kind = entry["path"], entry["type"]
        path = join(workspace, rel)
        parent_fresh = rel.rpartition("/")[0] in fresh and rel != ""
        if kind == "dir":
            if rel == "":
                os.chmod(path, 0o700)
                continue
            if not parent_fresh:
                try:
                    info = os.lstat(path)
                    if stat.S_ISDIR(info.st_mode):
                        os.chmod(path, 0o700)
                        continue
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            os.mkdir(path, 0o700)
            fresh.add(rel)
        elif kind == "file":
            total_bytes += entry["size"]
            if not parent_fresh:
                info = None
                try:
                    info = os.lstat(path)
                except FileNotFoundError:
                    pass
                # tar replaces a regular file itself (unlink, create)
                if info is not None and (entry.get("chunks") is not None or not stat.S_ISREG(info.st_mode)):
                    remove_any(path)
            if entry.get("chunks") is not None:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                try:
                    os.ftruncate(fd, entry["size"])
                    if entry["size"] > 0:
                        try:
                            os.posix_fallocate(fd, 0, entry["size"])
                        except OSError as e:
                            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                                raise
                finally:
                    os.close(fd)
                big_files.append(entry)
        elif not parent_fresh:
            remove_any(path)
    prepared = time.monotonic()

    # the data. Groups first: their download is short but their extraction (thousands of file creations, in
    # the background) is long, so it overlaps the chunks' transfer instead of trailing it. Then the chunks of
    # the big files, largest files first.
    placements: dict = {}
    for entry in sorted(big_files, key=lambda e: -e["size"]):
        for key, (offset, _) in zip(entry["chunks"], chunk_ranges(entry["size"])):  # noqa: B905 (3.8)
            placements.setdefault(key, []).append((join(workspace, entry["path"]), offset))
    jobs: queue.Queue = queue.Queue()
    groups = {entry["group"]: None for entry in entries if entry["type"] == "file" and entry.get("chunks") is None}
    for key in groups:
        jobs.put((key, None))
    for key, targets in placements.items():
        jobs.put((key, targets))
    object_count = jobs.qsize()
    errors: list = []
    background = Background(2 * RESTORE_THREADS, errors)

    def worker():
        connections = Connections()
        try:
            while not errors:
                try:
                    key, targets = jobs.get_nowait()
                except queue.Empty:
                    return
                record = objects[key]
                if targets is None:
                    sink = GroupArchive(workspace)
                elif record["encoding"] == "raw":
                    sink = RawChunk(targets)
                else:
                    sink = ZstdChunk(targets, record["size"])
                begun = time.monotonic()
                piped = isinstance(sink, PipeSink)
                if piped:
                    background.slots.acquire()
                try:
                    fetch(connections, urls[key], key, record, sink, check_key=isinstance(sink, RawChunk))
                    sink.finish()
                    if TRACE:
                        sys.stderr.write(f"{time.monotonic() - started:8.3f} {type(sink).__name__} {key[:12]} "
                                         f"{record['size']} in {time.monotonic() - begun:.3f}s\n")
                except Failure as e:
                    errors.append(str(e))
                except Exception as e:  # noqa: BLE001 (any surprise fails the restore with a reason)
                    errors.append(f"object {key}: {type(e).__name__}: {e}")
                else:
                    if piped:
                        background.hand_over(key, sink)
                    continue
                sink.abort()
                if piped:
                    background.slots.release()
        finally:
            connections.close()

    threads = [threading.Thread(target=worker) for _ in range(min(RESTORE_THREADS, max(object_count, 1)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    background.join()
    if errors:
        raise Failure(errors[0])
    data_done = time.monotonic()

    # metadata: big files, symlinks, then directories deepest first (writing into one changes its mtime)
    def owner(path: str, entry: dict, follow: bool = True) -> None:
        if as_root:
            os.chown(path, entry["uid"], entry["gid"], follow_symlinks=follow)

    for entry in big_files:
        path = join(workspace, entry["path"])
        owner(path, entry)
        os.chmod(path, entry["mode"])
        os.utime(path, ns=(entry["mtime_ns"], entry["mtime_ns"]))
    for entry in entries:
        if entry["type"] == "symlink":
            path = join(workspace, entry["path"])
            os.symlink(entry["target"], path)
            owner(path, entry, follow=False)
            os.utime(path, ns=(entry["mtime_ns"], entry["mtime_ns"]), follow_symlinks=False)
    for entry in reversed(entries):
        if entry["type"] == "dir":
            path = join(workspace, entry["path"])
            owner(path, entry)
            os.chmod(path, entry["mode"])
            os.utime(path, ns=(entry["mtime_ns"], entry["mtime_ns"]))

    # the stat cache of what was restored: the next scan reads nothing again
    cache = {}
    for entry in entries:
        if entry["type"] == "file":
            info = os.lstat(join(workspace, entry["path"]))
            content = entry["chunks"] if entry.get("chunks") is not None else entry.get("sha256")
            cache[entry["path"]] = [info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns, content]
    state = state_dir()
    write_json(os.path.join(state, "cache.json"), {"workspace": workspace, "files": cache})
    for stale in ("cache.json.new", "scan.json"):
        try:
            os.unlink(os.path.join(state, stale))
        except FileNotFoundError:
            pass
    finished = time.monotonic()
    seconds = finished - started
    return {"bytes": total_bytes, "files": sum(1 for e in entries if e["type"] == "file"),
            "objects": object_count, "seconds": round(seconds, 3),
            "mb_per_second": round(total_bytes / 1e6 / seconds, 1) if seconds > 0 else 0.0,
            "phases": {"prepare": round(prepared - started, 3), "data": round(data_done - prepared, 3),
                       "metadata": round(finished - data_done, 3)}}


# ---- main -------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="the snapshot fast path, machine side")
    parser.add_argument("command", choices=["scan", "upload", "restore"])
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--urls", help="upload: the JSON file of PUT URLs (deleted once read)")
    parser.add_argument("--plan", help="restore: the JSON file of the manifest and GET URLs (deleted once read)")
    args = parser.parse_args(argv)
    args.workspace = os.path.abspath(args.workspace)
    try:
        if args.command == "scan":
            result = command_scan(args)
        elif args.command == "upload":
            if not args.urls:
                raise Failure("upload needs --urls")
            result = command_upload(args)
        else:
            if not args.plan:
                raise Failure("restore needs --plan")
            result = command_restore(args)
    except Failure as e:
        return fail(str(e))
    except OSError as e:
        # names a workspace path at most (never a URL: those live only in memory)
        return fail(f"{args.command} failed: {e.strerror or e} ({e.filename or ''})".replace(" ()", ""))
    sys.stdout.write(json.dumps(result, separators=(",", ":")) + "\n")
    return 0


def fail(reason: str) -> int:
    sys.stderr.write(f"dumont_fastpath: {reason}\n")
    sys.stdout.write(json.dumps({"error": reason}) + "\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
