"""Writes of the snapshots app: take, restore, delete, retention. Instance-free by design.

What a service needs of an instance comes in as arguments (its id, owner and the SSH target of its
machine): `instances` calls `snapshots`, never the other way round. Progress goes to an optional
`on_event(kind, message, data)` callback (the Celery tasks send it out as the `snapshot_event` signal).

Each run is a two-step, idempotent affair: a row is created (`pending`, with the machine it is about)
before anything touches a machine, then `*_run` locks the row, moves it to `running` and does the work;
a row that already finished is left alone, so a re-delivered task does nothing twice.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import shlex
import shutil
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from dumont.core.errors import Conflict, NotFound
from dumont.core.locks import advisory_lock, lock_key
from machines.keys import control_plane_key_path
from machines.ssh import PrivateKeyLike, SSHError, SSHTarget, connect
from snapshots import fastpath, fastpath_services, restic, selectors, storage
from snapshots.models import FastPathManifest, MachineKey, Snapshot, SnapshotRepository, SnapshotRestore
from snapshots.states import status_transition

log = logging.getLogger(__name__)

EventCallback = Callable[[str, str, dict[str, Any]], None]


def _no_events(kind: str, message: str, data: dict[str, Any]) -> None:
    pass


# ---- settings -> engine -----------------------------------------------------------------------


def restic_binary() -> str:
    binary = settings.SNAPSHOT_RESTIC_BINARY or shutil.which("restic")
    if not binary:
        # the preflight of `make run` installs it; a control plane started some other way may lack it
        raise restic.ResticError("restic is not installed on the control plane: install it (sudo apt-get install "
                                 "-y restic; macOS: brew install restic) or set SNAPSHOT_RESTIC_BINARY")
    return binary


def tuning() -> restic.Tuning:
    return restic.Tuning(
        connections=settings.SNAPSHOT_RESTIC_CONNECTIONS,
        pack_size_mb=settings.SNAPSHOT_RESTIC_PACK_SIZE_MB,
        compression=settings.SNAPSHOT_RESTIC_COMPRESSION,
        command_timeout=settings.SNAPSHOT_COMMAND_TIMEOUT_SECONDS,
    )


def _local_runner() -> restic.LocalRunner:
    return restic.LocalRunner(restic_binary(), cache_dir=Path(settings.DUMONT_DATA_DIR) / "restic-cache")


def _control_plane_repository(repository: SnapshotRepository) -> restic.Repository:
    """The control plane's own view: the repository's first key and the store's admin credentials."""
    return restic.Repository(
        storage.repository_url(repository.prefix), repository.password, storage.admin_credentials(),
        settings.SNAPSHOT_S3_REGION, key_hint=repository.control_key_id,
    )


def _machine_repository(repository: SnapshotRepository, key: MachineKey, *, ttl_seconds: int) -> restic.Repository:
    """What a user's machine receives: its own restic key, and storage keys for its owner's prefix that
    expire after `ttl_seconds` and cannot delete (README "Isolation"). Never the repository's password."""
    credentials = storage.machine_credentials(repository.prefix, holder=key.label, ttl_seconds=ttl_seconds)
    return restic.Repository(storage.repository_url(repository.prefix), key.password, credentials,
                             settings.SNAPSHOT_S3_REGION, key_hint=key.restic_key_id)


# ---- machine keys -----------------------------------------------------------------------------


class MachineGone(Conflict):
    code = "machine_gone"


def machine_of(target: SSHTarget) -> str:
    """A machine's name for its keys (selectors.machine_name); MachineGone for one with no pinned host key."""
    name = selectors.machine_name(target)
    if not name:
        raise MachineGone("the machine has no pinned host key")
    return name


def machine_key_ensure(*, repository: SnapshotRepository, instance_id: int, target: SSHTarget) -> MachineKey:
    """The machine's own restic key to its owner's repository, added (`restic key add`, on the control
    plane) on first use. A machine whose key was revoked is gone: it gets none again (MachineGone)."""
    machine = machine_of(target)
    keys = MachineKey.objects.filter(instance_id=instance_id, machine=machine)
    key = keys.filter(revoked_at__isnull=True).first()
    if key is None:
        # gone only if one of its keys was revoked: a live key another task (the agent's sync set-up) committed
        # since the read above is no reason to refuse (it was, and failed a hibernation right after a launch)
        if keys.filter(revoked_at__isnull=False).exists():
            raise MachineGone(f"the machine of instance {instance_id} was replaced or destroyed")
        try:
            with transaction.atomic():
                key = MachineKey.objects.create(repository=repository, instance_id=instance_id, machine=machine,
                                                password=secrets.token_urlsafe(32))
        except IntegrityError:  # a concurrent first use on the same machine
            key = keys.get(revoked_at__isnull=True)
    if key.restic_key_id:
        return key
    _control_key_ensure(repository)
    with transaction.atomic():
        key = MachineKey.objects.select_for_update().get(pk=key.pk)
        if key.revoked_at is not None:
            raise MachineGone(f"the machine of instance {instance_id} was replaced or destroyed")
        if not key.restic_key_id:
            # a key added before its id was saved (a killed worker) is used, not added twice
            key.restic_key_id = _key_id_labelled(repository, key.label)
            if not key.restic_key_id:
                restic.key_add(_local_runner(), _control_plane_repository(repository), tuning(),
                               new_password=key.password, label=key.label)
                key.restic_key_id = _key_id_labelled(repository, key.label)
            if not key.restic_key_id:
                raise restic.ResticError(f"restic added key {key.label} but the repository does not list it")
            key.save(update_fields=["restic_key_id"])
    return key


def _key_id_labelled(repository: SnapshotRepository, label: str) -> str:
    return next((key_id for key_id, host in storage.repository_keys(repository.prefix).items() if host == label), "")


def _control_key_ensure(repository: SnapshotRepository) -> None:
    """Record which key the control plane's password opens (restic's key hint): the repository's one key
    that is not a machine's."""
    if repository.control_key_id:
        return
    own = [key_id for key_id, host in storage.repository_keys(repository.prefix).items()
           if not host.startswith(MachineKey.LABEL_PREFIX)]
    if len(own) == 1:
        repository.control_key_id = own[0]
        SnapshotRepository.objects.filter(pk=repository.pk).update(control_key_id=repository.control_key_id)


def machine_keys_revoke(*, instance_id: int, keep_machines: tuple[str, ...] = ()) -> int:
    """The instance's machine went (destroyed, hibernated, replaced): its keys are never handed out again.
    Their key files are removed by `machine_keys_remove` (a task right after, and the retention sweep)."""
    return (MachineKey.objects.filter(instance_id=instance_id, revoked_at__isnull=True)
            .exclude(machine__in=keep_machines).update(revoked_at=timezone.now()))


def machine_keys_remove(*, batch_size: int = 100) -> int:
    """Delete revoked keys' files from their repositories (a direct object delete with the control plane's
    key: no restic lock needed, a running backup of another machine is untouched). Returns how many."""
    removed = 0
    pending = (MachineKey.objects.filter(revoked_at__isnull=False, removed_at__isnull=True)
               .select_related("repository").order_by("pk")[:batch_size])
    for key in pending:
        try:
            key_id = key.restic_key_id or _key_added_unrecorded(key)
            if key_id:
                if key_id == key.repository.control_key_id:
                    raise RuntimeError(f"machine key {key.pk} names the control plane's key")
                storage.object_delete(f"{key.repository.prefix}/keys/{key_id}")
        except (restic.ResticError, storage.StorageError) as exc:
            log.warning("restic key of instance %s not removed yet: %s", key.instance_id, exc)
            continue
        MachineKey.objects.filter(pk=key.pk).update(removed_at=timezone.now())
        removed += 1
    return removed


def _key_added_unrecorded(key: MachineKey) -> str:
    """A key whose `key add` may have run before its id was saved: found by its label, or ""."""
    return _key_id_labelled(key.repository, key.label) if key.repository.initialized_at else ""


# ---- repositories ---------------------------------------------------------------------------


def repository_ensure(*, owner) -> SnapshotRepository:
    """The user's repository, created (own prefix, own random password) and initialized on first use."""
    repository = SnapshotRepository.objects.filter(owner=owner).first()
    if repository is not None and repository.initialized_at is not None:
        return repository
    if repository is None:
        try:
            with transaction.atomic():
                SnapshotRepository.objects.create(
                    owner=owner, prefix=f"users/{owner.pk}/{secrets.token_hex(4)}", password=secrets.token_urlsafe(32)
                )
        except IntegrityError:
            pass  # created by a concurrent first snapshot of the same user
    with transaction.atomic():
        repository = SnapshotRepository.objects.select_for_update().get(owner=owner)
        if repository.initialized_at is None:
            # under the row lock: two first snapshots of a user cannot both run `restic init`; and never
            # over a key already stored (a killed worker's init): a second master key would leave the
            # repository unreadable with the first ("config or key ... is damaged")
            storage.bucket_ensure()
            _init_once(repository)
            repository.initialized_at = timezone.now()
            repository.save(update_fields=["initialized_at"])
    return repository


# how long a stored key waits for its config (an init finishing) before it is judged a dead init's leftover
INIT_WAIT_SECONDS = 30.0


def _init_once(repository: SnapshotRepository) -> None:
    """`restic init`, unless a key is stored already (a killed worker's init): then use that repository,
    or, if its config never appears and it holds nothing else, clear the dead init's key and init afresh."""
    prefix, runner, restic_repository = repository.prefix, _local_runner(), _control_plane_repository(repository)
    if storage.has_objects(f"{prefix}/keys"):
        try:
            restic.wait_for_config(runner, restic_repository, tuning(), timeout=INIT_WAIT_SECONDS)
            return
        except restic.ResticError:
            if storage.has_objects(f"{prefix}/data") or storage.has_objects(f"{prefix}/snapshots"):
                raise  # it holds backups: never touched here
            log.warning("repository %s: clearing the key of an init that never finished", prefix)
            storage.repository_delete(prefix)
    restic.init(runner, restic_repository, tuning())


def repository_delete(*, owner) -> int:
    """Delete a user's whole repository from storage (the user is leaving). Returns the objects deleted."""
    repository = SnapshotRepository.objects.filter(owner=owner).first()
    if repository is None:
        return 0
    if Snapshot.objects.filter(owner=owner, status__in=Snapshot.ACTIVE).exists():
        raise Conflict("a snapshot of this user is still running")
    deleted = storage.repository_delete(repository.prefix)
    now = timezone.now()
    status_transition(Snapshot.objects.filter(owner=owner), Snapshot.Status.DELETED, deleted_at=now)
    Snapshot.objects.filter(owner=owner, forgotten_at__isnull=True).update(forgotten_at=now)
    repository.delete()
    return deleted


# ---- progress -------------------------------------------------------------------------------


class _ProgressReporter:
    """Saves the latest progress on the row (every second) and emits an event every few seconds."""

    def __init__(self, row: Snapshot, on_event: EventCallback):
        self.row = row
        self.on_event = on_event
        self.saved_at = 0.0
        self.emitted_at = time.monotonic()

    def __call__(self, progress: restic.Progress) -> None:
        now = time.monotonic()
        data = dataclasses.asdict(progress)
        if now - self.saved_at >= 1.0:
            self.saved_at = now
            Snapshot.objects.filter(pk=self.row.pk).update(progress=data)
        if now - self.emitted_at >= settings.SNAPSHOT_PROGRESS_EVENT_SECONDS:
            self.emitted_at = now
            self.on_event("snapshot", f"snapshot {self.row.pk}: {progress.percent:.0f}%", {"snapshot": self.row.pk, **data})


# ---- snapshots ------------------------------------------------------------------------------


def snapshot_create(*, owner, instance_id: int, target: SSHTarget, reason: str = Snapshot.Reason.MANUAL,
                    fast: bool = False) -> Snapshot:
    """Record the intent: a pending snapshot of that machine (with `fast`, a fast path too). One at a time per
    instance (409 otherwise)."""
    if reason not in Snapshot.Reason.values:
        raise ValueError(f"unknown snapshot reason {reason!r}")
    if not target.host or not target.host_key:
        raise Conflict(f"instance {instance_id} has no reachable machine (no SSH address or host key)")
    snapshot = Snapshot(owner=owner, instance_id=instance_id, reason=reason)
    snapshot.set_ssh_target(target)
    try:
        with transaction.atomic():
            _lock_instance_workspace(instance_id)
            if SnapshotRestore.objects.filter(instance_id=instance_id, status__in=SnapshotRestore.ACTIVE).exists():
                raise Conflict(f"instance {instance_id} is being restored; snapshot it afterwards")
            snapshot.save()
            if fast:
                fastpath_services.fast_request(snapshot)
    except IntegrityError:
        raise Conflict(f"a snapshot of instance {instance_id} is already in progress") from None
    return snapshot


def snapshot_run(*, snapshot_id: int, private_key: PrivateKeyLike | None = None,
                 on_event: EventCallback | None = None, read_back: bool = False) -> Snapshot:
    """Take a pending snapshot: back up the workspace on its machine and verify it. Idempotent.

    Verified means: restic on the machine exited 0, and the control plane's own restic lists the new
    snapshot in the repository; with `read_back` (a hibernation: the machine goes next) it also runs
    `restic check --read-data-subset=SNAPSHOT_VERIFY_READ_SUBSET`. An empty workspace is a verified, empty
    snapshot (no restic id: restic refuses to save one, and a restore of it has nothing to write)."""
    on_event = on_event or _no_events
    # `running` already means an earlier attempt died with its worker: run it again
    started = status_transition(Snapshot.objects.filter(pk=snapshot_id), Snapshot.Status.RUNNING,
                                started_at=timezone.now())
    snapshot = Snapshot.objects.get(pk=snapshot_id)
    if not started:
        return snapshot  # done already (a re-delivered task)
    parent_id, after_restore = _parent_of(snapshot.instance_id)
    fast = fastpath_services.fast_requested(snapshot)
    on_event("snapshot", f"snapshot {snapshot.pk} started ({snapshot.reason})",
             {"snapshot": snapshot.pk, "parent": parent_id, "after_restore": after_restore, "fastpath": fast})
    fast_running, fast_manifest = None, None
    try:
        with connect(snapshot.ssh_target, private_key or control_plane_key_path()) as session:
            repository = repository_ensure(owner=snapshot.owner)
            key = machine_key_ensure(repository=repository, instance_id=snapshot.instance_id,
                                     target=snapshot.ssh_target)
            installed = restic.restic_ensure(session, local_binary=restic_binary())
            if fast:  # beside restic's backup, at the same time, on the same connection
                fast_running = fastpath_services.take_start(session, snapshot=snapshot, prefix=repository.prefix)
            result = restic.backup(
                restic.RemoteRunner(session),
                _machine_repository(repository, key, ttl_seconds=settings.SNAPSHOT_TASK_TIME_LIMIT + 300), tuning(),
                host=f"instance-{snapshot.instance_id}", tags=snapshot.tags, parent_id=parent_id,
                after_restore=after_restore, on_progress=_ProgressReporter(snapshot, on_event),
                listed_by=_local_runner(), listed_repository=_control_plane_repository(repository),
            )
            if fast_running is not None:
                fast_manifest = fastpath_services.take_finish(fast_running, snapshot_verified=True)
                fast_running = None
        check_seconds = None
        if read_back and settings.SNAPSHOT_VERIFY_READ_SUBSET:
            check_seconds = restic.check_read_data(_local_runner(), _control_plane_repository(repository), tuning(),
                                                   subset=settings.SNAPSHOT_VERIFY_READ_SUBSET)
    except restic.EmptyWorkspace:
        _fast_abandon(fast_running, "the workspace is empty: nothing to restore")
        return _snapshot_empty(snapshot, on_event)
    except (restic.ResticError, SSHError, storage.StorageError, MachineGone) as exc:
        _fast_abandon(fast_running, f"its restic snapshot failed: {_failure_reason(exc)}")
        return _snapshot_failed(snapshot, exc, on_event)
    except BaseException as exc:  # a soft time limit, a worker shutting down: never leave it "running"
        _fast_abandon(fast_running, f"interrupted: {type(exc).__name__}")
        _snapshot_failed(snapshot, exc, on_event)
        raise
    if fast_manifest is not None:
        _fast_event(snapshot, fast_manifest, on_event)
    with transaction.atomic():
        snapshot = Snapshot.objects.select_for_update().get(pk=snapshot_id)
        now = timezone.now()
        status_transition(
            Snapshot.objects.filter(pk=snapshot_id), Snapshot.Status.VERIFIED, restic_snapshot_id=result.snapshot_id,
            parent_restic_snapshot_id=result.parent_id, size_bytes=result.total_bytes, added_bytes=result.data_added,
            file_count=result.total_files, duration_seconds=round(result.duration, 3),
            stats={**result.summary, "installed_restic": installed, "after_restore": after_restore,
                   "read_back_seconds": check_seconds,
                   "read_back_subset": settings.SNAPSHOT_VERIFY_READ_SUBSET if check_seconds is not None else None},
            progress={**snapshot.progress, "percent": 100.0}, verified_at=now, finished_at=now, error="",
            captured_at=parse_datetime(result.captured_at) or snapshot.started_at,
        )
    snapshot.refresh_from_db()
    on_event("snapshot", f"snapshot {snapshot.pk} verified: {result.short_id}, {result.total_bytes} bytes, "
             f"{result.data_added} added in {result.duration:.1f}s",
             {"snapshot": snapshot.pk, "restic_snapshot_id": result.snapshot_id, "size_bytes": result.total_bytes,
              "added_bytes": result.data_added, "file_count": result.total_files,
              "files_unmodified": result.files_unmodified, "duration_seconds": snapshot.duration_seconds})
    return snapshot


def _fast_abandon(running, reason: str) -> None:
    if running is not None:
        fastpath_services.take_abandon(running, reason)


def _fast_event(snapshot: Snapshot, manifest: FastPathManifest, on_event: EventCallback) -> None:
    if manifest.status == FastPathManifest.Status.VERIFIED:
        stats = manifest.stats
        on_event("snapshot", f"snapshot {snapshot.pk}: fast path verified, {stats.get('objects')} objects "
                 f"({stats.get('objects_uploaded')} uploaded, {manifest.uploaded_bytes} bytes) in "
                 f"{manifest.duration_seconds:.1f}s",
                 {"snapshot": snapshot.pk, "fastpath": manifest.pk, "uploaded_bytes": manifest.uploaded_bytes,
                  "stored_bytes": manifest.stored_bytes, **stats})
    else:
        log.warning("snapshot %s: fast path failed: %s", snapshot.pk, manifest.error)
        on_event("snapshot", f"snapshot {snapshot.pk}: fast path failed ({manifest.error}); a wake from it restores "
                 "with restic", {"snapshot": snapshot.pk, "fastpath": manifest.pk, "fastpath_error": manifest.error})


def fastpath_presync(*, owner, instance_id: int, target: SSHTarget,
                     private_key: PrivateKeyLike | None = None) -> FastPathManifest | None:
    """Bring the instance's fast path up to date from its running machine (after a periodic sync), without a
    snapshot: objects and a presync manifest that is never restored from, only reused, so the hibernation's
    fast path uploads only what changed since. None when there is nothing to do now (the fast path is off, a
    snapshot or restore of the instance runs). Its failure costs nothing but a slower next hibernation."""
    if not settings.SNAPSHOT_FASTPATH:
        return None
    if (Snapshot.objects.filter(instance_id=instance_id, status__in=Snapshot.ACTIVE).exists()
            or SnapshotRestore.objects.filter(instance_id=instance_id, status__in=SnapshotRestore.ACTIVE).exists()):
        return None
    repository = repository_ensure(owner=owner)
    with advisory_lock(fastpath_services.TAKE_LOCK, instance_id) as acquired:
        if not acquired:
            return None  # a snapshot's fast path is being written: this presync is not needed
        take = fastpath_services.take_prepare(owner_id=owner.pk, instance_id=instance_id, prefix=repository.prefix)
        try:
            with connect(target, private_key or control_plane_key_path()) as session:
                taken = fastpath_services.take_guarded(session, take)
        except SSHError as exc:
            taken = fastpath_services.FastTaken(error=_failure_reason(exc))
        except BaseException as exc:
            fastpath_services.take_record(take.manifest_id, fastpath_services.FastTaken(
                error=f"interrupted: {type(exc).__name__}"))
            raise
        manifest = fastpath_services.take_record(take.manifest_id, taken)
    if manifest.error:
        log.warning("fast path presync of instance %s failed: %s", instance_id, manifest.error)
    return manifest


def snapshot_take(*, owner, instance_id: int, target: SSHTarget, reason: str = Snapshot.Reason.MANUAL,
                  private_key: PrivateKeyLike | None = None, on_event: EventCallback | None = None,
                  read_back: bool = False) -> Snapshot:
    """Create and run a snapshot now, in this process (hibernation calls this from its own task)."""
    snapshot = snapshot_create(owner=owner, instance_id=instance_id, target=target, reason=reason)
    return snapshot_run(snapshot_id=snapshot.pk, private_key=private_key, on_event=on_event, read_back=read_back)


def _snapshot_empty(snapshot: Snapshot, on_event: EventCallback) -> Snapshot:
    """An empty workspace: a valid snapshot with nothing in it (no restic id, nothing to restore)."""
    now = timezone.now()
    status_transition(
        Snapshot.objects.filter(pk=snapshot.pk), Snapshot.Status.VERIFIED, restic_snapshot_id="", size_bytes=0,
        added_bytes=0, file_count=0, stats={"empty": True}, verified_at=now, finished_at=now,
        captured_at=snapshot.started_at or now, error="",
    )
    on_event("snapshot", f"snapshot {snapshot.pk}: the workspace is empty, nothing to store",
             {"snapshot": snapshot.pk, "empty": True})
    snapshot.refresh_from_db()
    return snapshot


def _snapshot_failed(snapshot: Snapshot, exc: BaseException, on_event: EventCallback) -> Snapshot:
    reason = _failure_reason(exc)
    restic_id = exc.snapshot_id if isinstance(exc, restic.ResticError) else ""
    status_transition(Snapshot.objects.filter(pk=snapshot.pk), Snapshot.Status.FAILED, error=reason,
                      restic_snapshot_id=restic_id, finished_at=timezone.now(), verified_at=None)
    log.warning("snapshot %s failed: %s", snapshot.pk, reason)
    on_event("snapshot", f"snapshot {snapshot.pk} failed: {reason}", {"snapshot": snapshot.pk, "error": reason})
    snapshot.refresh_from_db()
    return snapshot


def _failure_reason(exc: BaseException) -> str:
    if isinstance(exc, restic.ResticError):
        return exc.reason
    if isinstance(exc, SSHError):
        return f"SSH: {exc}"
    if isinstance(exc, storage.StorageError | MachineGone):
        return exc.detail
    if isinstance(exc, fastpath.FastPathError):
        return exc.reason
    return f"interrupted: {type(exc).__name__}: {exc}"[:500]


def _parent_of(instance_id: int) -> tuple[str, bool]:
    """The snapshot this workspace last matched, and whether that was a restore (new inodes and ctimes)."""
    last_snapshot = (
        Snapshot.objects.filter(instance_id=instance_id, status=Snapshot.Status.VERIFIED)
        .exclude(restic_snapshot_id="").order_by(*Snapshot.NEWEST_FIRST).first()
    )
    last_restore = (
        SnapshotRestore.objects.filter(
            instance_id=instance_id, status=SnapshotRestore.Status.SUCCEEDED,
            snapshot__status=Snapshot.Status.VERIFIED,  # a forgotten parent would make restic fail
        ).order_by("-finished_at").first()
    )
    if last_restore and (last_snapshot is None or last_restore.finished_at > last_snapshot.finished_at) \
            and last_restore.restic_snapshot_id:
        return last_restore.restic_snapshot_id, True
    if last_snapshot:
        return last_snapshot.restic_snapshot_id, False
    return "", False


def _lock_instance_workspace(instance_id: int) -> None:
    """Serialize "is anything running on this workspace?" checks (transaction-scoped advisory lock)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(hashtext('snapshots.workspace'), %s)", [instance_id])


def snapshot_delete(*, owner, snapshot_id: int) -> Snapshot:
    """Hide the snapshot at once; retention forgets it from restic (which needs the repository's lock)."""
    with transaction.atomic():
        snapshot = (
            Snapshot.objects.select_for_update().filter(owner=owner, pk=snapshot_id)
            .exclude(status=Snapshot.Status.DELETED).first()
        )
        if snapshot is None:
            raise NotFound(f"No snapshot {snapshot_id}.")
        if snapshot.status in Snapshot.ACTIVE:
            raise Conflict(f"snapshot {snapshot_id} is {snapshot.status}; delete it once it has finished",
                           data={"status": snapshot.status})
        if SnapshotRestore.objects.filter(snapshot=snapshot, status__in=SnapshotRestore.ACTIVE).exists():
            raise Conflict(f"snapshot {snapshot_id} is being restored", data={"status": snapshot.status})
        status_transition(Snapshot.objects.filter(pk=snapshot.pk), Snapshot.Status.DELETED, deleted_at=timezone.now())
    snapshot.refresh_from_db()
    return snapshot


# ---- restores -------------------------------------------------------------------------------


def restore_create(*, owner, snapshot_id: int | None, instance_id: int, target: SSHTarget,
                   from_instance_id: int | None = None) -> SnapshotRestore:
    """Record a pending restore of a verified snapshot of `owner` onto the machine `target`.

    `snapshot_id` None: the newest verified snapshot of `from_instance_id` (default: `instance_id`).
    """
    if not target.host or not target.host_key:
        raise Conflict(f"instance {instance_id} has no reachable machine (no SSH address or host key)")
    owned = Snapshot.objects.filter(owner=owner).exclude(status=Snapshot.Status.DELETED)
    if snapshot_id is None:
        snapshot = (owned.filter(instance_id=from_instance_id or instance_id, status=Snapshot.Status.VERIFIED)
                    .order_by(*Snapshot.NEWEST_FIRST).first())
        if snapshot is None:
            raise NotFound(f"instance {from_instance_id or instance_id} has no verified snapshot")
    else:
        snapshot = owned.filter(pk=snapshot_id).first()
        if snapshot is None:
            raise NotFound(f"No snapshot {snapshot_id}.")
        if snapshot.status != Snapshot.Status.VERIFIED:
            raise Conflict(f"snapshot {snapshot_id} is {snapshot.status}; only a verified snapshot can be restored",
                           data={"status": snapshot.status})
    restore = SnapshotRestore(owner=owner, snapshot=snapshot, instance_id=instance_id,
                              restic_snapshot_id=snapshot.restic_snapshot_id)
    restore.set_ssh_target(target)
    try:
        with transaction.atomic():
            _lock_instance_workspace(instance_id)
            if Snapshot.objects.filter(instance_id=instance_id, status__in=Snapshot.ACTIVE).exists():
                raise Conflict(f"a snapshot of instance {instance_id} is in progress; restore it afterwards")
            restore.save()
    except IntegrityError:
        raise Conflict(f"a restore into instance {instance_id} is already in progress") from None
    return restore


def restore_run(*, restore_id: int, private_key: PrivateKeyLike | None = None,
                on_event: EventCallback | None = None) -> SnapshotRestore:
    """Restore into the workspace of the recorded machine. Idempotent (a restore may simply run again)."""
    on_event = on_event or _no_events
    started = status_transition(SnapshotRestore.objects.filter(pk=restore_id), SnapshotRestore.Status.RUNNING,
                                started_at=timezone.now())
    restore = SnapshotRestore.objects.select_related("snapshot").get(pk=restore_id)
    if not started:
        return restore  # done already (a re-delivered task)
    short_id = restore.restic_snapshot_id[:8]
    on_event("restore", f"restore of snapshot {restore.snapshot_id} ({short_id}) started",
             {"restore": restore.pk, "snapshot": restore.snapshot_id, "size_bytes": restore.snapshot.size_bytes or 0})
    started = time.monotonic()
    installed, method, figures = False, "", {}
    try:
        if restore.restic_snapshot_id:  # else an empty workspace's snapshot: nothing to write
            with connect(restore.ssh_target, private_key or control_plane_key_path()) as session:
                repository = repository_ensure(owner=restore.owner)
                method, figures = _restore_fast(session, restore, repository, on_event)
                if method != "fastpath":
                    key = machine_key_ensure(repository=repository, instance_id=restore.instance_id,
                                             target=restore.ssh_target)
                    installed = restic.restic_ensure(session, local_binary=restic_binary())
                    machine_repository = _machine_repository(repository, key,
                                                             ttl_seconds=settings.SNAPSHOT_TASK_TIME_LIMIT + 300)
                    restic.restore(restic.RemoteRunner(session), machine_repository, tuning(),
                                   snapshot_id=restore.restic_snapshot_id)
                    method = "restic"
    except (restic.ResticError, SSHError, storage.StorageError, MachineGone) as exc:
        return _restore_failed(restore, exc, on_event)
    except BaseException as exc:
        _restore_failed(restore, exc, on_event)
        raise
    duration = round(time.monotonic() - started, 3)
    size = int(figures.get("bytes") or restore.snapshot.size_bytes or 0)
    stats = {**figures, "bytes": size, "mb_per_second": round(size / 1e6 / duration, 1) if duration else None}
    status_transition(SnapshotRestore.objects.filter(pk=restore.pk), SnapshotRestore.Status.SUCCEEDED,
                      installed_restic=installed, duration_seconds=duration, finished_at=timezone.now(), error="",
                      method=method, stats=stats)
    how = {"fastpath": "the fast path", "restic": "restic"}.get(method, "nothing to write")
    on_event("restore", f"restore of snapshot {restore.snapshot_id} done in {duration:.1f}s with {how}: "
             f"{size / 1e6:.0f} MB at {stats['mb_per_second'] or 0:.0f} MB/s",
             {"restore": restore.pk, "snapshot": restore.snapshot_id, "duration_seconds": duration,
              "size_bytes": size, "mb_per_second": stats["mb_per_second"], "method": method})
    restore.refresh_from_db()
    return restore


def _restore_fast(session, restore: SnapshotRestore, repository: SnapshotRepository,
                  on_event: EventCallback) -> tuple[str, dict]:
    """The fast path when the snapshot has a verified one: ("fastpath", its figures). Any failure is said in the
    events and left to restic, which rewrites every file of the snapshot: ("", {"fastpath_error": why})."""
    manifest = fastpath_services.manifest_of(restore.snapshot)
    if manifest is None:
        return "", {}
    try:
        return "fastpath", fastpath_services.restore(session, manifest, repository.prefix)
    except (fastpath.FastPathError, storage.StorageError, SSHError) as exc:
        reason = _failure_reason(exc)
        log.warning("restore %s: the fast path failed, restic restores instead: %s", restore.pk, reason)
        on_event("restore", f"restore of snapshot {restore.snapshot_id}: the fast path failed ({reason}); "
                 "restoring with restic instead", {"restore": restore.pk, "fastpath": manifest.pk,
                                                   "fastpath_error": reason})
        if isinstance(exc, SSHError) and not session.active:
            raise  # the machine is unreachable: restic cannot do better
        return "", {"fastpath_error": reason}


def snapshot_restore(*, owner, instance_id: int, target: SSHTarget, snapshot_id: int | None = None,
                     from_instance_id: int | None = None, private_key: PrivateKeyLike | None = None,
                     on_event: EventCallback | None = None) -> SnapshotRestore:
    """Restore now, in this process (wake calls this): the chosen snapshot, or the newest verified one."""
    restore = restore_create(owner=owner, snapshot_id=snapshot_id, instance_id=instance_id, target=target,
                             from_instance_id=from_instance_id)
    return restore_run(restore_id=restore.pk, private_key=private_key, on_event=on_event)


def _restore_failed(restore: SnapshotRestore, exc: BaseException, on_event: EventCallback) -> SnapshotRestore:
    reason = _failure_reason(exc)
    status_transition(SnapshotRestore.objects.filter(pk=restore.pk), SnapshotRestore.Status.FAILED, error=reason,
                      finished_at=timezone.now())
    log.warning("restore %s failed: %s", restore.pk, reason)
    on_event("restore", f"restore of snapshot {restore.snapshot_id} failed: {reason}",
             {"restore": restore.pk, "snapshot": restore.snapshot_id, "error": reason})
    restore.refresh_from_db()
    return restore


# ---- retention ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RetentionResult:
    expired: list[int]  # snapshot rows this run moved to deleted
    forgotten: list[str]  # restic ids forgotten (and pruned)
    skipped: str = ""  # why nothing was done (a backup holds the repository)


def _expired(snapshots: list[Snapshot]) -> list[Snapshot]:
    """Of one instance's verified snapshots (newest first), those retention may drop.

    Kept: the newest one whatever its reason (what a wake restores), the newest hibernation one (the
    workspace a machine was destroyed after), every manual one (the user deletes those), the newest SNAPSHOT_KEEP_PERIODIC periodic ones and the newest
    SNAPSHOT_KEEP_HIBERNATE hibernation (and failover) ones.
    """
    keep_counts = {
        Snapshot.Reason.PERIODIC: settings.SNAPSHOT_KEEP_PERIODIC,
        Snapshot.Reason.HIBERNATE: settings.SNAPSHOT_KEEP_HIBERNATE,
        Snapshot.Reason.FAILOVER: settings.SNAPSHOT_KEEP_HIBERNATE,
    }
    seen: dict[str, int] = {}
    expired = []
    newest_hibernation = next((s for s in snapshots if s.reason == Snapshot.Reason.HIBERNATE), None)
    for index, snapshot in enumerate(snapshots):
        if index == 0 or snapshot.reason == Snapshot.Reason.MANUAL:
            continue
        seen[snapshot.reason] = seen.get(snapshot.reason, 0) + 1
        if seen[snapshot.reason] > keep_counts[snapshot.reason] and snapshot is not newest_hibernation:
            expired.append(snapshot)
    return expired


def snapshots_apply_retention(*, owner) -> RetentionResult:
    """Expire what the policy no longer keeps, forget it (and deleted ones) in restic, prune, measure."""
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_xact_lock(%s::bigint)", [lock_key("snapshots.retention", owner.pk)])
            if not cursor.fetchone()[0]:
                return RetentionResult([], [], skipped="another retention run of this user is running")
        return _apply_retention(owner)


def _apply_retention(owner) -> RetentionResult:
    repository = SnapshotRepository.objects.filter(owner=owner, initialized_at__isnull=False).first()
    if repository is None:
        return RetentionResult([], [])
    _fail_stale(owner)
    # forget/prune take restic's exclusive lock, which a running backup or restore holds: next round
    busy = (Snapshot.objects.filter(owner=owner, status__in=Snapshot.ACTIVE).exists()
            or SnapshotRestore.objects.filter(owner=owner, status__in=SnapshotRestore.ACTIVE).exists()
            or FastPathManifest.objects.filter(owner=owner, status=FastPathManifest.Status.PENDING).exists())
    if busy:
        return RetentionResult([], [], skipped="a backup or restore of this user is running")

    verified = list(Snapshot.objects.filter(owner=owner, status=Snapshot.Status.VERIFIED)
                    .order_by("instance_id", *Snapshot.NEWEST_FIRST))
    by_instance: dict[int, list[Snapshot]] = {}
    for snapshot in verified:
        by_instance.setdefault(snapshot.instance_id, []).append(snapshot)
    expired = [s for group in by_instance.values() for s in _expired(group)]
    now = timezone.now()
    status_transition(Snapshot.objects.filter(pk__in=[s.pk for s in expired], status=Snapshot.Status.VERIFIED),
                      Snapshot.Status.DELETED, deleted_at=now)
    # deleted by the user or expired above, and failed ones restic saved anyway (exit 3): not restorable
    to_forget = Snapshot.objects.filter(
        owner=owner, forgotten_at__isnull=True, status__in=[Snapshot.Status.DELETED, Snapshot.Status.FAILED]
    ).exclude(restic_snapshot_id="")
    ids = {s.pk: s.restic_snapshot_id for s in to_forget}
    if ids:
        restic.forget(_local_runner(), _control_plane_repository(repository), tuning(), sorted(set(ids.values())),
                      prune=True)
        Snapshot.objects.filter(pk__in=list(ids)).update(forgotten_at=timezone.now())
        repository.pruned_at = timezone.now()
    try:
        fastpath_services.fastpath_apply_retention(repository)
    except storage.StorageError as exc:  # restic's retention stands; the fast path's garbage waits a round
        log.warning("fast-path retention of user %s not applied yet: %s", owner.pk, exc)
    repository.size_bytes = storage.repository_size(repository.prefix)
    repository.size_measured_at = timezone.now()
    repository.save(update_fields=["pruned_at", "size_bytes", "size_measured_at"])
    return RetentionResult([s.pk for s in expired], sorted(set(ids.values())))


def snapshots_keep_latest(*, owner, instance_id: int) -> int:
    """Keep only the instance's newest verified snapshot (a hibernation whose reservation is released).

    The others leave the API at once and are forgotten from restic now, or by the next retention
    pass if a backup of another instance holds the repository. Returns how many were dropped.
    """
    verified = Snapshot.objects.filter(owner=owner, instance_id=instance_id, status=Snapshot.Status.VERIFIED)
    latest = verified.order_by(*Snapshot.NEWEST_FIRST).first()
    if latest is None:
        return 0
    dropped = status_transition(verified.exclude(pk=latest.pk), Snapshot.Status.DELETED, deleted_at=timezone.now())
    if dropped:
        try:
            snapshots_apply_retention(owner=owner)
        except (restic.ResticError, storage.StorageError) as exc:
            log.warning("snapshots of instance %s not forgotten yet (retention will): %s", instance_id, exc)
    return dropped


def _fail_stale(owner) -> None:
    """Rows left running by a worker that died (its task past every time limit): failed, not running forever."""
    cutoff = timezone.now() - timedelta(seconds=settings.SNAPSHOT_TASK_TIME_LIMIT + 60)
    reason = "interrupted: the worker running it stopped before it finished"
    status_transition(Snapshot.objects.filter(owner=owner, created_at__lt=cutoff), Snapshot.Status.FAILED,
                      error=reason, finished_at=timezone.now())
    status_transition(SnapshotRestore.objects.filter(owner=owner, created_at__lt=cutoff), SnapshotRestore.Status.FAILED,
                      error=reason, finished_at=timezone.now())
    # and a fast path left pending (a killed presync): it would hold every retention pass of the owner off
    FastPathManifest.objects.filter(owner=owner, status=FastPathManifest.Status.PENDING, created_at__lt=cutoff).update(
        status=FastPathManifest.Status.FAILED, error=reason)


# ---- the agent's periodic sync ----------------------------------------------------------------


def sync_config(*, owner, instance_id: int, target: SSHTarget) -> tuple[str, dict[str, str], float | None]:
    """The command and environment DumontAgent runs for its periodic incremental backup on the machine
    `target`, and when the environment's storage keys expire (None: never; the agent renews them first,
    `sync_credentials`).

    The same backup as `snapshot_run` (our restic on the machine, the machine's own restic key, storage keys
    for the owner's prefix that cannot delete), tagged `periodic`; the environment goes into the agent's
    0600 config, never argv. restic picks the previous snapshot of the same host and path as the parent.
    """
    repository = repository_ensure(owner=owner)
    key = machine_key_ensure(repository=repository, instance_id=instance_id, target=target)
    credentials, expires_at = sync_credentials(owner=owner, instance_id=instance_id, target=target)
    machine_repository = restic.Repository(storage.repository_url(repository.prefix), key.password, credentials,
                                           settings.SNAPSHOT_S3_REGION, key_hint=key.restic_key_id)
    args = restic.backup_args(machine_repository, tuning(), host=f"instance-{instance_id}",
                              tags=(f"instance-{instance_id}", Snapshot.Reason.PERIODIC))
    command = ('cd "${DUMONT_WORKSPACE:-/workspace}" && exec "' + restic.REMOTE_BIN_DIR + '/restic" '
               + " ".join(shlex.quote(a) for a in args))
    return command, machine_repository.env(), expires_at


def sync_credentials(*, owner, instance_id: int, target: SSHTarget) -> tuple[storage.Credentials, float | None]:
    """Storage keys for the agent sync of the machine `target` (the owner's repository prefix only, no
    deletes), and when they expire (AGENT_SYNC_CREDENTIALS_TTL_SECONDS; the agent renews them).
    Only for a machine whose restic key is live: a replaced or destroyed one gets MachineGone. No storage
    I/O here but the `r2` key request; StorageError without a repository."""
    repository = SnapshotRepository.objects.filter(owner=owner, initialized_at__isnull=False).first()
    if repository is None:
        raise storage.StorageError(f"user {owner.pk} has no snapshot repository yet")
    key = MachineKey.objects.filter(instance_id=instance_id, machine=machine_of(target), revoked_at__isnull=True,
                                    repository=repository).exclude(restic_key_id="").first()
    if key is None:
        raise MachineGone(f"instance {instance_id} has no live machine key for this machine")
    ttl = settings.AGENT_SYNC_CREDENTIALS_TTL_SECONDS
    credentials = storage.machine_credentials(repository.prefix, holder=key.label, ttl_seconds=ttl)
    expires_at = time.time() + ttl if storage.machine_credentials_expire() else None
    return credentials, expires_at


def snapshot_record_periodic(*, owner, instance_id: int, report: dict) -> Snapshot | None:
    """Record the agent's last sync (its heartbeat's `sync.last`) once, verified from the control plane:
    it counts only if restic exited 0 and the repository lists the snapshot *as this instance's* (its host
    says `instance-<id>`: an agent cannot pass off another instance's snapshot). Ordered by restic's own
    snapshot time, not by when it was recorded. The caller holds the instance's lifecycle lock and saw it
    running (instances/agent_setup.py). Returns the new row. The report comes from the machine: an id that
    is no restic id is ignored, a duration that is no number dropped."""
    restic_id = str(report.get("snapshot_id") or "")
    if not restic.is_snapshot_id(restic_id):
        if restic_id:
            log.warning("instance %s reports a sync with no restic snapshot id: %r", instance_id, restic_id[:80])
        return None
    duration = report.get("duration")
    if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not 0 <= duration < 10**9:
        duration = None
    if Snapshot.objects.filter(instance_id=instance_id, restic_snapshot_id__startswith=restic_id).exists():
        return None
    repository = repository_ensure(owner=owner)
    # only a snapshot of this very instance (its host, and its tag when the sync sets one): a host naming
    # another instance's snapshot (same repository) would otherwise have it recorded as its own
    listed = restic.snapshot_info(_local_runner(), _control_plane_repository(repository), tuning(), restic_id)
    ours = f"instance-{instance_id}"
    belongs = listed is not None and listed.get("hostname") == ours
    verified = belongs and report.get("exit_code") == 0
    now = timezone.now()
    if listed is None:
        error = f"agent sync exited {report.get('exit_code')}, snapshot not listed in the repository"
    elif not belongs:
        error = f"snapshot {restic_id} is not this instance's (host {listed.get('hostname')!r})"
    else:
        error = "" if verified else f"agent sync exited {report.get('exit_code')}"
    return Snapshot.objects.create(
        owner=owner, instance_id=instance_id, reason=Snapshot.Reason.PERIODIC,
        restic_snapshot_id=listed["id"] if belongs else restic_id,
        status=Snapshot.Status.VERIFIED if verified else Snapshot.Status.FAILED, error=error,
        duration_seconds=duration, verified_at=now if verified else None, finished_at=now,
        forgotten_at=None if belongs or listed is None else now,  # never forget another instance's snapshot
        captured_at=(parse_datetime(str(listed.get("time") or "")) if belongs else None) or now,
    )
