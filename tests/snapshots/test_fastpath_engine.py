"""The snapshot fast path, end to end with real parts: the program on two sshd machines, the engine driving
it over SSH, the development S3 server behind presigned URLs."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from machines.ssh import CommandResult, connect
from snapshots import fastpath
from snapshots.fastpath import BIG_FILE, CHUNK, FastPathError, Scan
from tests.snapshots.helpers import UNICODE_NAME, Machine

BUCKET = "dumont-fastpath"
PREFIX = "users/1/fastpath"
TIMEOUT = 120
MiB = 1 << 20


class Store:
    """The control plane's side in these tests: presigned URLs and the records of what is stored."""

    def __init__(self, server, admin):
        self.root = Path(server.root)
        endpoint = getattr(server, "fast_endpoint", server.endpoint)
        self.client = self._client(endpoint, admin.access_key_id, admin.secret_access_key)
        self.forged = self._client(endpoint, admin.access_key_id, "not-the-secret-" + secrets.token_hex(8))
        self.stored: dict[str, dict] = {}  # key -> {stored_size, stored_sha256, encoding}: the lead's DB rows
        try:
            self.client.create_bucket(Bucket=BUCKET)
        except ClientError as e:
            if e.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    @staticmethod
    def _client(endpoint: str, key_id: str, secret: str):
        return boto3.client("s3", endpoint_url=endpoint, region_name="auto", aws_access_key_id=key_id,
                            aws_secret_access_key=secret, config=Config(s3={"addressing_style": "path"}))

    def urls(self, keys, method: str = "get_object", client=None) -> dict[str, str]:
        client = client or self.client
        return {key: client.generate_presigned_url(
            method, Params={"Bucket": BUCKET, "Key": fastpath.object_name(PREFIX, key)}, ExpiresIn=600)
            for key in keys}

    def path(self, key: str) -> Path:
        return self.root / "buckets" / BUCKET / fastpath.object_name(PREFIX, key)

    def missing(self, scan: Scan) -> list[str]:
        return sorted(key for key in scan.objects if key not in self.stored)

    def snapshot(self, session) -> tuple[Scan, dict, dict]:
        """scan, upload what storage lacks, manifest: what a hibernation does."""
        scan = fastpath.scan(session, timeout=TIMEOUT)
        uploaded = fastpath.upload(session, self.urls(self.missing(scan), "put_object"), timeout=TIMEOUT)
        self.stored.update(uploaded["objects"])
        return scan, uploaded, fastpath.manifest_build(scan, self.stored)

    def restore(self, session, manifest: dict) -> dict:
        return fastpath.restore(session, manifest, self.urls(manifest["objects"]), timeout=TIMEOUT)


@pytest.fixture(scope="module")
def store(s3) -> Store:
    return Store(s3.server, s3.admin)


@pytest.fixture
def pair(machines) -> Iterator[tuple[Machine, Machine]]:
    source, target = machines.start(), machines.start()
    try:
        yield source, target
    finally:
        source.stop()
        target.stop()


def session_of(machine: Machine, control_key: Path):
    session = connect(machine.target, control_key)
    fastpath.program_ensure(session)
    return session


def tree(root: Path) -> dict[str, tuple]:
    """Everything the restore must reproduce: type, mode, owner, mtime in ns, content or target."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in ["", *dirnames, *filenames] if dirpath == str(root) else [*dirnames, *filenames]:
            path = Path(dirpath) / name
            info = path.lstat()
            rel = str(path.relative_to(root))
            common = (info.st_uid, info.st_gid, info.st_mtime_ns)
            if stat.S_ISLNK(info.st_mode):
                found[rel] = ("symlink", os.readlink(path), *common)
            elif stat.S_ISDIR(info.st_mode):
                found[rel] = ("dir", stat.S_IMODE(info.st_mode), *common)
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                found[rel] = ("file", stat.S_IMODE(info.st_mode), info.st_size, digest, *common)
    return found


def compressible(size: int) -> bytes:
    line = b"step 00042 loss 0.123456 lr 3e-4 grad_norm 1.5\n"
    return (line * (size // len(line) + 1))[:size]


def make_tree(root: Path) -> None:
    """Every awkward case of the contract, ~80 MB."""
    (root / "src" / "pkg").mkdir(parents=True)
    for i in range(30):
        (root / "src" / "pkg" / f"module_{i}.py").write_text(f"def f{i}():\n    return {i}\n" * (i + 1))
    (root / UNICODE_NAME).write_text("unicode and spaces survive\n")
    (root / "empty.txt").write_bytes(b"")
    (root / "empty dir" / "nested empty").mkdir(parents=True)
    private = root / "private"
    private.mkdir(mode=0o700)
    (private / ".netrc").write_text("machine example.com\n")
    (private / ".netrc").chmod(0o600)
    script = root / "train.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    owned = root / "owned-by-1234"
    owned.write_text("uid and gid survive\n")
    os.chown(owned, 1234, 5678)
    models = root / "models"
    models.mkdir()
    (models / "exactly-chunk.bin").write_bytes(os.urandom(CHUNK))
    (models / "big-file-minus-1.bin").write_bytes(os.urandom(BIG_FILE - 1))
    (models / "big-file.bin").write_bytes(os.urandom(BIG_FILE))
    (models / "same-as-big-file.bin").write_bytes((models / "big-file.bin").read_bytes())  # one object, twice
    (models / "logs-compressible.bin").write_bytes(compressible(CHUNK + 5 * MiB))
    (root / "latest.bin").symlink_to("models/big-file.bin")
    (root / "dangling").symlink_to("does/not/exist")
    # odd nanoseconds everywhere, set last (writing into a directory changes its mtime)
    for index, path in enumerate(sorted(root.rglob("*"), key=lambda p: -len(p.parts))):
        ns = 1_600_000_000_123_456_789 + index * 1_000_001
        os.utime(path, ns=(ns, ns), follow_symlinks=False)
    os.utime(root, ns=(1_500_000_000_000_000_001, 1_500_000_000_000_000_001))


# ---- the round trip --------------------------------------------------------------------------------------


def test_snapshot_restores_every_kind_of_entry_exactly(store: Store, pair, control_key: Path):
    source, target = pair
    make_tree(source.workspace)
    with session_of(source, control_key) as src, session_of(target, control_key) as dst:
        scan, uploaded, manifest = store.snapshot(src)
        kinds = {record["kind"] for record in scan.objects.values()}
        assert kinds == {"chunk", "group"}
        assert scan.bytes_hashed == scan.workspace_bytes  # first scan: everything read
        encodings = {uploaded["objects"][key]["encoding"] for key in scan.objects}
        assert encodings == {"raw", "zstd"}  # random weights raw, logs compressed
        big = next(e for e in scan.entries if e["path"] == "models/big-file.bin")
        twin = next(e for e in scan.entries if e["path"] == "models/same-as-big-file.bin")
        assert big["chunks"] == twin["chunks"]
        assert next(e for e in scan.entries if e["path"] == "models/big-file-minus-1.bin").get("group")

        stats = store.restore(dst, manifest)
        assert stats["bytes"] == scan.workspace_bytes and stats["files"] == scan.files
        assert tree(target.workspace) == tree(source.workspace)

        # the restored machine's next scan reads nothing, and sees the very same snapshot
        rescan = fastpath.scan(dst, timeout=TIMEOUT)
        assert rescan.bytes_hashed == 0
        assert rescan.entries == scan.entries and rescan.objects == scan.objects


def test_program_is_copied_once_and_replaced_when_it_differs(machines, control_key: Path):
    machine = machines.start()
    try:
        with connect(machine.target, control_key) as session:
            assert fastpath.program_ensure(session) is True
            assert fastpath.program_ensure(session) is False
            installed = machine.home / ".dumont" / "bin" / "dumont_fastpath.py"
            installed.write_text("# an older version\n")
            assert fastpath.program_ensure(session) is True
            assert installed.read_bytes() == fastpath.PROGRAM.read_bytes()
    finally:
        machine.stop()


# ---- incremental -----------------------------------------------------------------------------------------


def test_second_scan_reads_only_the_changed_file_and_asks_only_its_objects(store: Store, pair, control_key):
    source, _ = pair
    work = source.workspace
    (work / "data").mkdir()
    for i in range(600):  # ~18 MB of small files: several groups
        (work / "data" / f"shard_{i:04d}.txt").write_bytes(os.urandom(30_000))
    (work / "weights.bin").write_bytes(os.urandom(CHUNK + 3 * MiB))
    with session_of(source, control_key) as session:
        first, _, _ = store.snapshot(session)
        groups = [key for key, record in first.objects.items() if record["kind"] == "group"]
        assert len(groups) >= 2

        again = fastpath.scan(session, timeout=TIMEOUT)
        assert again.bytes_hashed == 0 and store.missing(again) == []

        changed = work / "data" / "shard_0300.txt"
        changed.write_bytes(os.urandom(30_000))
        after_small = fastpath.scan(session, timeout=TIMEOUT)
        assert after_small.bytes_hashed == 30_000
        entry = next(e for e in after_small.entries if e["path"] == "data/shard_0300.txt")
        assert store.missing(after_small) == [entry["group"]]
        store.snapshot(session)

        with open(work / "weights.bin", "r+b") as f:  # the second chunk only
            f.seek(CHUNK + MiB)
            f.write(os.urandom(4096))
        after_big = fastpath.scan(session, timeout=TIMEOUT)
        assert after_big.bytes_hashed == CHUNK + 3 * MiB  # that file, no other
        weights = next(e for e in after_big.entries if e["path"] == "weights.bin")
        assert store.missing(after_big) == [weights["chunks"][1]]


# ---- failures --------------------------------------------------------------------------------------------


def assert_no_url(reason: str) -> None:
    assert "X-Amz-Signature" not in reason and "X-Amz-Credential" not in reason and "://" not in reason


def small_snapshot(store: Store, machine: Machine, session) -> tuple[Scan, dict]:
    (machine.workspace / "notes.txt").write_text("small\n")
    (machine.workspace / "weights.bin").write_bytes(os.urandom(BIG_FILE + MiB))
    scan, _, manifest = store.snapshot(session)
    return scan, manifest


@pytest.mark.parametrize("kind", ["chunk", "group"])
def test_a_corrupted_object_fails_the_restore_naming_it(store: Store, pair, control_key, kind):
    source, target = pair
    with session_of(source, control_key) as src, session_of(target, control_key) as dst:
        scan, manifest = small_snapshot(store, source, src)
        chunk = next(key for key, record in scan.objects.items() if record["kind"] == kind)
        stored = store.path(chunk)
        data = bytearray(stored.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size: only the content lies
        stored.write_bytes(data)
        try:
            with pytest.raises(FastPathError) as failure:
                store.restore(dst, manifest)
        finally:
            data[len(data) // 2] ^= 0xFF
            stored.write_bytes(data)
        assert chunk in failure.value.reason and "corrupt" in failure.value.reason
        assert_no_url(failure.value.reason)


def test_an_archive_that_tar_cannot_extract_fails_the_restore(store: Store, pair, control_key):
    """The extraction finishes in the background, after its worker moved on: its failure still counts."""
    source, target = pair
    with session_of(source, control_key) as src, session_of(target, control_key) as dst:
        scan, manifest = small_snapshot(store, source, src)
        group = next(key for key, record in scan.objects.items() if record["kind"] == "group")
        stored = store.path(group)
        original = stored.read_bytes()
        # the same size (the fast endpoint caches sizes), intact as stored (its sha256 matches), but no archive
        garbage = os.urandom(len(original))
        stored.write_bytes(garbage)
        lying = copy.deepcopy(manifest)
        lying["objects"][group].update(stored_size=len(garbage), stored_sha256=hashlib.sha256(garbage).hexdigest())
        try:
            with pytest.raises(FastPathError) as failure:
                store.restore(dst, lying)
        finally:
            stored.write_bytes(original)
        assert group in failure.value.reason and "tar failed" in failure.value.reason
        assert_no_url(failure.value.reason)


def test_a_forbidden_url_fails_restore_and_upload(store: Store, pair, control_key):
    source, target = pair
    with session_of(source, control_key) as src, session_of(target, control_key) as dst:
        scan, manifest = small_snapshot(store, source, src)
        with pytest.raises(FastPathError) as restore_failure:
            fastpath.restore(dst, manifest, store.urls(manifest["objects"], client=store.forged), timeout=TIMEOUT)
        assert "403" in restore_failure.value.reason
        assert_no_url(restore_failure.value.reason)

        (source.workspace / "new.txt").write_text("not uploaded yet\n")
        rescan = fastpath.scan(src, timeout=TIMEOUT)
        forged = store.urls(store.missing(rescan), "put_object", client=store.forged)
        with pytest.raises(FastPathError) as upload_failure:
            fastpath.upload(src, forged, timeout=TIMEOUT)
        assert "403" in upload_failure.value.reason
        assert_no_url(upload_failure.value.reason)
        # nothing was left behind that holds a URL
        assert not list((source.home / ".dumont" / "fastpath").glob("urls-*"))
        assert not list((target.home / ".dumont" / "fastpath").glob("plan-*"))


@pytest.mark.parametrize("bad_path", ["../escaped", "/abs/path", "a//b", "models/./x"])
def test_a_manifest_with_an_unsafe_path_is_refused_before_anything_is_written(store, pair, control_key, bad_path):
    source, target = pair
    with session_of(source, control_key) as src, session_of(target, control_key) as dst:
        _, manifest = small_snapshot(store, source, src)
        hostile = copy.deepcopy(manifest)
        victim = next(e for e in hostile["entries"] if e["path"] == "notes.txt")
        victim["path"] = bad_path
        hostile["entries"].sort(key=lambda e: e["path"].encode())
        with pytest.raises(FastPathError):
            fastpath.restore(dst, hostile, store.urls(hostile["objects"]), timeout=TIMEOUT)

        # the program refuses it too, on its own (a control plane bug must not reach the disk)
        plan = target.home / ".dumont" / "fastpath" / "plan-hostile.json"
        plan.parent.mkdir(parents=True, exist_ok=True)
        dst.write_file(str(plan), json.dumps({"manifest": hostile, "urls": store.urls(hostile["objects"])}).encode())
        result = dst.run(f'python3 "{fastpath.REMOTE_PROGRAM}" restore --workspace "$DUMONT_WORKSPACE" '
                         f"--plan {plan}", timeout=TIMEOUT)
        assert result.exit_code == 1
        assert "unsafe path" in json.loads(result.stdout.splitlines()[-1])["error"]
        assert not plan.exists()  # it held URLs
        assert list(target.workspace.iterdir()) == []
        assert not (target.dir / "escaped").exists()


@pytest.mark.parametrize("which", ["weights.bin", "notes.txt"])  # a chunk, a group member
def test_a_file_changed_between_scan_and_upload_fails_the_upload(store: Store, machines, control_key, which):
    machine = machines.start()
    try:
        with session_of(machine, control_key) as session:
            (machine.workspace / "notes.txt").write_text("before\n")
            (machine.workspace / "weights.bin").write_bytes(os.urandom(BIG_FILE + MiB))
            scan = fastpath.scan(session, timeout=TIMEOUT)
            with open(machine.workspace / which, "r+b") as f:
                f.write(b"after!")
            with pytest.raises(FastPathError) as failure:
                fastpath.upload(session, store.urls(scan.objects, "put_object"), timeout=TIMEOUT)
            assert which in failure.value.reason and "changed since the scan" in failure.value.reason
            # a failed upload never lets the next scan trust what this one read
            assert not (machine.home / ".dumont" / "fastpath" / "cache.json").exists()
            assert fastpath.scan(session, timeout=TIMEOUT).bytes_hashed == scan.workspace_bytes
    finally:
        machine.stop()


# ---- what the machine says is validated ------------------------------------------------------------------

KEY_A, KEY_B = "a" * 64, "b" * 64


def scan_document() -> dict:
    """A well-formed scan: a root, a directory, a small file, a big file, a symlink."""
    def base(path, kind, **more):
        return {"path": path, "type": kind, "uid": 0, "gid": 0, "mtime_ns": 1, **more}

    return {
        "entries": [
            base("", "dir", mode=0o755),
            base("d", "dir", mode=0o700),
            base("d/big", "file", mode=0o644, size=BIG_FILE, chunks=[KEY_A]),
            base("d/small", "file", mode=0o644, size=3, group=KEY_B, sha256="c" * 64),
            base("link", "symlink", target="d/small"),
        ],
        "objects": {KEY_A: {"kind": "chunk", "size": BIG_FILE}, KEY_B: {"kind": "group", "size": 3}},
        "workspace_bytes": BIG_FILE + 3, "files": 2, "skipped": 0, "seconds": 0.5, "bytes_hashed": 0,
    }


def test_a_well_formed_scan_parses():
    scan = fastpath.parse_scan(scan_document())
    assert scan.files == 2 and scan.workspace_bytes == BIG_FILE + 3
    manifest = fastpath.manifest_build(scan, {KEY_A: {"stored_size": 10, "stored_sha256": KEY_A, "encoding": "raw"},
                                              KEY_B: {"stored_size": 5, "stored_sha256": "d" * 64,
                                                      "encoding": "zstd"}})
    fastpath.check_manifest(manifest)
    with pytest.raises(FastPathError, match="neither in storage nor uploaded"):
        fastpath.manifest_build(scan, {KEY_A: manifest["objects"][KEY_A]})


def _entry(document: dict, path: str) -> dict:
    return next(e for e in document["entries"] if e["path"] == path)


HOSTILE = {
    "huge size": lambda d: _entry(d, "d/small").update(size=2**70),
    "NaN size": lambda d: _entry(d, "d/small").update(size=float("nan")),
    "float mtime": lambda d: _entry(d, "d").update(mtime_ns=1.5),
    "bool uid": lambda d: _entry(d, "d").update(uid=True),
    "negative gid": lambda d: _entry(d, "d").update(gid=-1),
    "mode bits": lambda d: _entry(d, "d").update(mode=0o17777),
    "infinite seconds": lambda d: d.update(seconds=float("inf")),
    "bad object key": lambda d: d["objects"].update({"../../etc": {"kind": "chunk", "size": 1}}),
    "upper-case key": lambda d: _entry(d, "d/big").update(chunks=[KEY_A.upper()]),
    "chunk too big": lambda d: d["objects"][KEY_A].update(size=CHUNK + 1),
    "parent path": lambda d: _entry(d, "link").update(path="../link"),
    "absolute path": lambda d: _entry(d, "link").update(path="/link"),
    "empty segment": lambda d: _entry(d, "link").update(path="d//x"),
    "NUL in path": lambda d: _entry(d, "link").update(path="li\0nk"),
    "not UTF-8": lambda d: _entry(d, "link").update(path="l\udcffnk"),
    "under a symlink": lambda d: d["entries"].append(
        {"path": "link/x", "type": "dir", "mode": 0o755, "uid": 0, "gid": 0, "mtime_ns": 1}),
    "unsorted": lambda d: d["entries"].reverse(),
    "duplicate": lambda d: d["entries"].append(copy.deepcopy(d["entries"][-1])),
    "unknown type": lambda d: _entry(d, "link").update(type="fifo"),
    "missing chunk": lambda d: _entry(d, "d/big").update(chunks=[KEY_B]),
    "chunk count": lambda d: _entry(d, "d/big").update(size=CHUNK + 1),
    "group bytes": lambda d: d["objects"][KEY_B].update(size=4),
    "unused object": lambda d: d["objects"].update({"e" * 64: {"kind": "chunk", "size": 1}}),
    "wrong total": lambda d: d.update(workspace_bytes=1),
    "wrong file count": lambda d: d.update(files=3),
    "no root": lambda d: d["entries"].pop(0),
}


@pytest.mark.parametrize("mutation", sorted(HOSTILE))
def test_hostile_scan_output_is_refused(mutation):
    document = scan_document()
    HOSTILE[mutation](document)
    with pytest.raises(FastPathError):
        fastpath.parse_scan(document)


def test_non_json_numbers_from_the_machine_are_refused():
    for line in ('{"size": NaN}', '{"size": Infinity}', "not json"):
        assert fastpath._last_json(CommandResult(0, line, "", 0.1)) is None


def test_a_machine_printing_a_hostile_scan_gets_an_error(machines, control_key: Path):
    machine = machines.start()
    try:
        with session_of(machine, control_key) as session:
            document = scan_document()
            document["entries"][2]["size"] = 10**30
            program = machine.home / ".dumont" / "bin" / "dumont_fastpath.py"
            program.write_text(f"print({json.dumps(json.dumps(document))})\n")  # what a tampered machine says
            with pytest.raises(FastPathError, match="file size"):
                fastpath.scan(session, timeout=TIMEOUT)
    finally:
        machine.stop()


def test_error_reasons_never_carry_a_url():
    url = "https://s3.example/b/k?X-Amz-Algorithm=AWS4&X-Amz-Signature=abcdef"
    reason = FastPathError(f"GET {url} failed; X-Amz-Signature=abc").reason
    assert_no_url(reason)
    assert "abcdef" not in reason


def test_object_and_manifest_names():
    assert fastpath.object_name("users/42/ab12cd34/", KEY_A) == f"users/42/ab12cd34/fast/objects/aa/{KEY_A}"
    assert fastpath.manifest_name("users/42/ab12cd34", "m1") == "users/42/ab12cd34/fast/manifests/m1.json"
    with pytest.raises(FastPathError):
        fastpath.object_name("users/42", "../x")
    with pytest.raises(FastPathError):
        fastpath.manifest_name("users/42", "../x")
