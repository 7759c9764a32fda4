"""The fast path's writes (issue #12): a restore-optimised copy of a workspace beside its restic snapshot.

restic stays the history (periodic syncs, manual snapshots, retention) and the fallback; the fast path is
what a wake restores from, at the speed of the disk and the network (the engine and the machine program:
snapshots/fastpath.py, agent/daemon/dumont_fastpath.py; the layout: README "Fast wake").

**Take** (a hibernation, or a snapshot asked for with `fast`), on the same SSH connection as restic's backup
and at the same time, in a thread that touches no database:
  1. `take_prepare` (database, before anything is uploaded): a pending `FastPathManifest` row, and the keys
     this instance's verified manifests name (the only ones a new manifest may reuse: a workspace never
     trusts objects another instance's machine uploaded);
  2. the machine scans its workspace (a stat cache makes it incremental);
  3. the control plane lists what storage holds, presigns a PUT for each missing object (that object only,
     short-lived: the machine holds no storage key) and the machine uploads them;
  4. the control plane lists storage again: every object the manifest names must be there, at its size;
  5. the manifest is written last (the commit point) and its sha256 kept on the row: `verified`.
Retention and garbage collection never run while a snapshot of the owner runs (services._apply_retention),
so an object a running take reuses cannot go under it.

**Restore** (`restore`): the stored manifest read back and checked against the row's sha256, a presigned GET
per object, the machine writes the workspace. The caller (services.restore_run) falls back to restic on any
failure and says so in the instance's events.

**Garbage** (`fastpath_apply_retention`, from the retention pass): each instance keeps the fast path of its
newest verified snapshot that has one; objects no live manifest names, older than
SNAPSHOT_FASTPATH_GC_GRACE_SECONDS, are deleted with the manifests of deleted rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from dumont.core.locks import advisory_lock
from machines.ssh import SSHError, SSHSession
from snapshots import fastpath, storage
from snapshots.models import FastPathManifest, Snapshot, SnapshotRepository

log = logging.getLogger(__name__)

# the slowest link a transfer is given time for when its URLs are presigned (bytes per second)
_SLOWEST_LINK = 20_000_000


@dataclasses.dataclass(frozen=True)
class FastTake:
    """What the take's thread needs, read from the database before it starts."""

    manifest_id: int
    prefix: str
    reusable: frozenset[str]
    # the instance's verified manifests (id, sha256), newest first: where reused objects' records are read
    previous: tuple[tuple[int, str], ...] = ()


@dataclasses.dataclass
class FastTaken:
    """What the thread brings back: the manifest's figures, or why it failed."""

    manifest_sha256: str = ""
    object_keys: list[str] = dataclasses.field(default_factory=list)
    workspace_bytes: int = 0
    stored_bytes: int = 0
    uploaded_bytes: int = 0
    file_count: int = 0
    stats: dict = dataclasses.field(default_factory=dict)
    error: str = ""


def url_ttl(size_bytes: int) -> int:
    """How long a presigned URL lives: enough for the whole transfer over a slow link, and never longer than a
    snapshot task may run."""
    return int(min(settings.SNAPSHOT_TASK_TIME_LIMIT, 300 + size_bytes / _SLOWEST_LINK))


# ---- take -------------------------------------------------------------------------------------


def fast_requested(snapshot: Snapshot) -> bool:
    """Whether this snapshot takes a fast path: a hibernation's always (SNAPSHOT_FASTPATH), another one when it
    was asked for (`fast_request`)."""
    if not settings.SNAPSHOT_FASTPATH:
        return False
    return snapshot.reason == Snapshot.Reason.HIBERNATE or FastPathManifest.objects.filter(snapshot=snapshot).exists()


def fast_request(snapshot: Snapshot) -> FastPathManifest:
    """Ask for a fast path with a snapshot (its intent row, before the task runs)."""
    return FastPathManifest.objects.get_or_create(snapshot=snapshot, defaults={
        "owner_id": snapshot.owner_id, "instance_id": snapshot.instance_id})[0]


def take_prepare(*, owner_id: int, instance_id: int, prefix: str, snapshot: Snapshot | None = None) -> FastTake:
    """The intent row (pending; a re-run of the same snapshot starts it over; no snapshot: a presync) and the
    keys it may reuse: those this instance's verified manifests name."""
    with transaction.atomic():
        if snapshot is None:
            row = FastPathManifest.objects.create(owner_id=owner_id, instance_id=instance_id)
        else:
            row, _ = FastPathManifest.objects.select_for_update().get_or_create(
                snapshot=snapshot, defaults={"owner_id": owner_id, "instance_id": instance_id})
            FastPathManifest.objects.filter(pk=row.pk).update(status=FastPathManifest.Status.PENDING, error="",
                                                               manifest_sha256="", verified_at=None)
        reusable, previous = set(), []
        for manifest_id, sha256, keys in (
                FastPathManifest.objects.filter(instance_id=instance_id, status=FastPathManifest.Status.VERIFIED)
                .exclude(pk=row.pk).order_by("-pk").values_list("pk", "manifest_sha256", "object_keys")):
            reusable.update(keys)
            previous.append((manifest_id, sha256))
    return FastTake(row.pk, prefix, frozenset(reusable), tuple(previous))


@dataclasses.dataclass
class FastTakeRunning:
    manifest_id: int
    executor: ThreadPoolExecutor
    future: Future
    lock: contextlib.ExitStack = dataclasses.field(default_factory=contextlib.ExitStack)


# One fast path written per instance at a time (a presync, a snapshot's): the machine's program keeps one scan
# in its state directory. A session-level advisory lock, held by the task's own connection.
TAKE_LOCK = "snapshots-fastpath-take"
TAKE_LOCK_WAIT_SECONDS = 60.0


def take_start(session: SSHSession, *, snapshot: Snapshot, prefix: str) -> FastTakeRunning:
    """Start a snapshot's fast path in a thread (it shares the SSH connection, on its own channels);
    `take_finish` joins it. A presync still running after TAKE_LOCK_WAIT_SECONDS: this one fails at once."""
    lock = contextlib.ExitStack()
    acquired = lock.enter_context(advisory_lock(TAKE_LOCK, snapshot.instance_id,
                                                wait_seconds=TAKE_LOCK_WAIT_SECONDS))
    take = take_prepare(owner_id=snapshot.owner_id, instance_id=snapshot.instance_id, prefix=prefix,
                        snapshot=snapshot)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastpath")
    if not acquired:
        lock.close()
        busy = Future()
        busy.set_result(FastTaken(error="another fast path of this instance (a presync) is still being written"))
        return FastTakeRunning(take.manifest_id, executor, busy)
    storage.fast_client()  # made here, once: boto3 does not create clients safely from two threads at once
    return FastTakeRunning(take.manifest_id, executor, executor.submit(take_guarded, session, take), lock)


def take_guarded(session: SSHSession, take: FastTake) -> FastTaken:
    try:
        return take_run(session, take)
    except (fastpath.FastPathError, storage.StorageError, SSHError) as exc:
        return FastTaken(error=_reason(exc))
    except Exception as exc:  # a bug must not cost the hibernation its restic snapshot
        log.exception("fast path snapshot %s failed", take.manifest_id)
        return FastTaken(error=f"{type(exc).__name__}: {exc}"[:500])


def take_run(session: SSHSession, take: FastTake) -> FastTaken:
    """Scan, upload what storage lacks, check storage has every object, write the manifest. No database."""
    started = time.monotonic()
    fastpath.program_ensure(session)
    scan = fastpath.scan(session, timeout=settings.SNAPSHOT_COMMAND_TIMEOUT_SECONDS)
    scanned = time.monotonic()
    stored = storage.fast_objects(take.prefix)
    # reused: named by this instance's verified manifests, and in storage at the size they recorded
    candidates = {key for key in scan.objects if key in take.reusable and key in stored}
    previous = {key: record for key, record in _records_of(take, candidates).items()
                if stored[key][0] == record["stored_size"]}
    missing = [key for key in scan.objects if key not in previous]
    missing_bytes = sum(scan.objects[key]["size"] for key in missing)
    ttl = url_ttl(missing_bytes)
    urls = {key: storage.fast_presign("put_object", fastpath.object_name(take.prefix, key), ttl) for key in missing}
    # even with nothing to upload: a successful upload is what lets the machine keep this scan's stat cache
    uploaded = fastpath.upload(session, urls, timeout=settings.SNAPSHOT_COMMAND_TIMEOUT_SECONDS)
    records = {key: uploaded["objects"][key] for key in missing if key in uploaded["objects"]}
    if len(records) != len(missing):
        raise fastpath.FastPathError(f"the machine uploaded {len(records)} of {len(missing)} objects")
    records.update(previous)
    uploaded_at = time.monotonic()
    # verified: storage itself lists every object at the size the manifest says
    stored = storage.fast_objects(take.prefix)
    absent = [key for key, record in records.items() if stored.get(key, (None,))[0] != record["stored_size"]]
    if absent:
        raise fastpath.FastPathError(f"{len(absent)} objects are not in storage at their size (e.g. {absent[0][:12]})")
    manifest = fastpath.manifest_build(scan, records)
    body = json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode()
    storage.fast_put(fastpath.manifest_name(take.prefix, take.manifest_id), body)
    return FastTaken(
        manifest_sha256=hashlib.sha256(body).hexdigest(), object_keys=sorted(records),
        workspace_bytes=scan.workspace_bytes, stored_bytes=sum(r["stored_size"] for r in records.values()),
        uploaded_bytes=int(uploaded.get("bytes_uploaded") or 0), file_count=scan.files,
        stats={"scan_seconds": round(scanned - started, 3), "upload_seconds": round(uploaded_at - scanned, 3),
               "verify_seconds": round(time.monotonic() - uploaded_at, 3), "objects": len(records),
               "objects_uploaded": len(missing), "objects_reused": len(previous), "bytes_hashed": scan.bytes_hashed,
               "skipped": scan.skipped, "total_seconds": round(time.monotonic() - started, 3)},
    )


def _records_of(take: FastTake, keys: set[str]) -> dict[str, dict]:
    """The stored records of objects to reuse, from the newest verified manifest of the instance that names
    them (the row holds keys, the stored manifest the records). A key found in none is uploaded again."""
    found: dict[str, dict] = {}
    for manifest_id, sha256 in take.previous:
        if len(found) == len(keys):
            break
        objects = manifest_read(take.prefix, manifest_id, sha256)["objects"]
        found.update({key: objects[key] for key in keys - found.keys() if key in objects})
    return found


def take_finish(running: FastTakeRunning, *, snapshot_verified: bool, snapshot_error: str = "") -> FastPathManifest:
    """Join the take's thread and record what it did. A fast path counts only with its restic snapshot."""
    try:
        taken = running.future.result()
    finally:
        running.executor.shutdown(wait=True)
        running.lock.close()
    if not taken.error and not snapshot_verified:
        taken.error = f"its restic snapshot failed: {snapshot_error}"[:500]
    return take_record(running.manifest_id, taken)


def take_record(manifest_id: int, taken: FastTaken) -> FastPathManifest:
    rows = FastPathManifest.objects.filter(pk=manifest_id, status=FastPathManifest.Status.PENDING)
    if taken.error:
        rows.update(status=FastPathManifest.Status.FAILED, error=taken.error, stats=taken.stats)
    else:
        rows.update(status=FastPathManifest.Status.VERIFIED, object_keys=taken.object_keys,
                    manifest_sha256=taken.manifest_sha256, workspace_bytes=taken.workspace_bytes,
                    stored_bytes=taken.stored_bytes, uploaded_bytes=taken.uploaded_bytes,
                    file_count=taken.file_count, duration_seconds=taken.stats.get("total_seconds"),
                    stats=taken.stats, verified_at=timezone.now(), error="")
    return FastPathManifest.objects.get(pk=manifest_id)


def take_abandon(running: FastTakeRunning, reason: str) -> None:
    """The snapshot stopped (a time limit, a worker shutting down): the thread's SSH channels die with the
    connection; the row is failed, not left pending."""
    running.executor.shutdown(wait=False, cancel_futures=True)
    running.lock.close()
    FastPathManifest.objects.filter(pk=running.manifest_id, status=FastPathManifest.Status.PENDING).update(
        status=FastPathManifest.Status.FAILED, error=reason[:500])


def _reason(exc: BaseException) -> str:
    if isinstance(exc, fastpath.FastPathError):
        return exc.reason
    if isinstance(exc, storage.StorageError):
        return exc.detail
    return f"SSH: {exc}"


# ---- restore ----------------------------------------------------------------------------------


def manifest_of(snapshot: Snapshot) -> FastPathManifest | None:
    """The verified fast path of a snapshot, if it has one (and the fast path is on)."""
    if not settings.SNAPSHOT_FASTPATH:
        return None
    return FastPathManifest.objects.filter(snapshot=snapshot, status=FastPathManifest.Status.VERIFIED).first()


def manifest_read(prefix: str, manifest_id: int, sha256: str) -> dict:
    """The stored manifest, only if it is the one the control plane wrote (its sha256)."""
    body = storage.fast_get(fastpath.manifest_name(prefix, manifest_id))
    if hashlib.sha256(body).hexdigest() != sha256:
        raise fastpath.FastPathError(f"the stored manifest {manifest_id} is not the one that was verified")
    return json.loads(body)


def restore(session: SSHSession, manifest_row: FastPathManifest, prefix: str) -> dict:
    """Write the workspace from the fast path: the manifest, a presigned GET per object, the machine's
    program. Returns its figures (bytes, seconds, MB/s); FastPathError/StorageError/SSHError otherwise."""
    manifest = manifest_read(prefix, manifest_row.pk, manifest_row.manifest_sha256)
    size = sum(int(record.get("stored_size") or 0) for record in manifest.get("objects", {}).values())
    ttl = url_ttl(size)
    urls = {key: storage.fast_presign("get_object", fastpath.object_name(prefix, key), ttl)
            for key in manifest.get("objects", {})}
    fastpath.program_ensure(session)
    return fastpath.restore(session, manifest, urls, timeout=settings.SNAPSHOT_COMMAND_TIMEOUT_SECONDS)


# ---- retention and garbage --------------------------------------------------------------------


def fastpath_apply_retention(repository: SnapshotRepository) -> dict:
    """Each instance keeps the fast path of its newest verified snapshot that has one; a fast path whose
    snapshot is gone goes with it; then objects that no live manifest names (and older than the grace) and the
    manifests of deleted rows are deleted from storage. The caller holds the owner's retention lock and saw no
    snapshot of the owner running (services._fail_stale failed the pending rows a dead worker left)."""
    owner_id = repository.owner_id
    now = timezone.now()
    FastPathManifest.objects.filter(owner_id=owner_id, status=FastPathManifest.Status.VERIFIED,
                                    snapshot__isnull=False).exclude(snapshot__status=Snapshot.Status.VERIFIED).update(
        status=FastPathManifest.Status.DELETED, deleted_at=now)
    verified = (FastPathManifest.objects.filter(owner_id=owner_id, status=FastPathManifest.Status.VERIFIED)
                .order_by("instance_id", F("snapshot__captured_at").desc(nulls_last=True),
                          F("snapshot__finished_at").desc(nulls_last=True), "-pk")
                .values_list("pk", "instance_id", "snapshot_id", "created_at"))
    newest: dict[int, object] = {}  # instance -> when the fast path of its newest snapshot was taken
    presyncs, older = [], []
    for manifest_id, instance_id, snapshot_id, created_at in verified:
        if snapshot_id is None:
            presyncs.append((created_at, manifest_id, instance_id))
        elif instance_id in newest:
            older.append(manifest_id)
        else:
            newest[instance_id] = created_at
    # a presync counts until a newer one, or a newer snapshot's fast path, holds what it uploaded
    kept = set()
    for created_at, manifest_id, instance_id in sorted(presyncs, reverse=True):
        if instance_id in kept or (instance_id in newest and created_at < newest[instance_id]):
            older.append(manifest_id)
        else:
            kept.add(instance_id)
    FastPathManifest.objects.filter(pk__in=older).update(status=FastPathManifest.Status.DELETED, deleted_at=now)
    return fastpath_collect_garbage(repository)


def fastpath_collect_garbage(repository: SnapshotRepository) -> dict:
    """Delete what no live manifest names: objects older than the grace, and manifests of rows that are not live."""
    owner_id = repository.owner_id
    live = set()
    for keys in FastPathManifest.objects.filter(owner_id=owner_id, status__in=FastPathManifest.LIVE).values_list(
            "object_keys", flat=True):
        live.update(keys)
    live_manifests = set(FastPathManifest.objects.filter(owner_id=owner_id, status__in=FastPathManifest.LIVE)
                         .values_list("pk", flat=True))
    cutoff = time.time() - settings.SNAPSHOT_FASTPATH_GC_GRACE_SECONDS
    doomed = [fastpath.object_name(repository.prefix, key)
              for key, (_size, modified) in storage.fast_objects(repository.prefix).items()
              if key not in live and modified < cutoff]
    manifests = [name for manifest_id, name in storage.fast_manifests(repository.prefix).items()
                 if manifest_id not in live_manifests]
    storage.fast_delete(doomed + manifests)
    return {"objects_deleted": len(doomed), "manifests_deleted": len(manifests)}
