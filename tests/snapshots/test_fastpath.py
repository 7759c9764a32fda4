"""The fast path through the snapshot services: taken beside restic at hibernation, restored by a wake (any
restore), incremental, verified in storage, falling back to restic, and collected by retention. Real restic, the
dev S3 server, real SSH into sshd machines."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from snapshots import fastpath, services, storage
from snapshots.models import FastPathManifest, Snapshot, SnapshotRepository, SnapshotRestore
from tests.factories import make_instance, make_user
from tests.snapshots.conftest import BUCKET
from tests.snapshots.helpers import make_workspace, manifest

pytestmark = pytest.mark.django_db

HIBERNATE = Snapshot.Reason.HIBERNATE


def _workspace(root: Path) -> None:
    """The small awkward tree of the other tests plus a big file cut into chunks, one compressible."""
    make_workspace(root, weights_mb=2, source_files=60)
    (root / "models" / "big.safetensors").write_bytes(os.urandom(40 << 20))  # two chunks, stored raw
    (root / "data" / "big.jsonl").write_text('{"text": "the same words again"}\n' * 400_000)  # ~13 MB, zstd


def _events() -> tuple[list, callable]:
    seen: list[tuple[str, str, dict]] = []
    return seen, lambda *event: seen.append(event)


def _object_path(s3, owner, key: str) -> Path:
    prefix = SnapshotRepository.objects.get(owner=owner).prefix
    return s3.server.root / "buckets" / BUCKET / fastpath.object_name(prefix, key)


def _hibernation(owner, instance, machine, **kwargs) -> Snapshot:
    return services.snapshot_take(owner=owner, instance_id=instance.pk, target=machine.target, reason=HIBERNATE,
                                  read_back=True, **kwargs)


def test_a_hibernation_stores_a_verified_fast_path_and_a_restore_writes_the_same_workspace_from_it(machines, s3):
    owner = make_user()
    instance = make_instance(owner, status="running")
    first, second = machines.start(), machines.start()
    _workspace(first.workspace)
    taken_events, on_taken = _events()

    snapshot = _hibernation(owner, instance, first, on_event=on_taken)

    assert snapshot.status == Snapshot.Status.VERIFIED, snapshot.error
    fast = FastPathManifest.objects.get(snapshot=snapshot)
    assert fast.status == FastPathManifest.Status.VERIFIED, fast.error
    assert fast.workspace_bytes > 55 << 20 and fast.uploaded_bytes > 0 and len(fast.manifest_sha256) == 64
    prefix = SnapshotRepository.objects.get(owner=owner).prefix
    stored = storage.fast_objects(prefix)
    assert set(fast.object_keys) <= set(stored)  # every object it names is in storage
    assert fast.pk in storage.fast_manifests(prefix)  # and the manifest, written last
    assert any("fast path verified" in message for _, message, _ in taken_events)
    assert fast.stats["objects_reused"] == 0 and fast.stats["objects_uploaded"] == len(fast.object_keys)
    # nothing the machine was given (presigned URLs) stays on it
    state = first.home / ".dumont" / "fastpath"
    assert not any("X-Amz-Signature" in p.read_text(errors="replace") for p in state.rglob("*") if p.is_file())

    restored_events, on_restored = _events()
    restore = services.snapshot_restore(owner=owner, instance_id=instance.pk, target=second.target,
                                        on_event=on_restored)

    assert restore.status == SnapshotRestore.Status.SUCCEEDED, restore.error
    assert restore.method == "fastpath" and restore.stats["bytes"] == fast.workspace_bytes
    assert restore.stats["mb_per_second"] > 0
    assert manifest(second.workspace) == manifest(first.workspace)
    done = restored_events[-1]
    assert "with the fast path" in done[1] and "MB/s" in done[1] and done[2]["method"] == "fastpath"
    assert not second.restic.exists()  # restic was not needed

    # the restored machine's next hibernation after a 1-file change uploads that file's group only
    (second.workspace / "src" / "pkg" / "module_7.py").write_text("def f7():\n    return 'changed'\n")
    again = _hibernation(owner, instance, second)

    assert again.status == Snapshot.Status.VERIFIED, again.error
    incremental = FastPathManifest.objects.get(snapshot=again)
    assert incremental.status == FastPathManifest.Status.VERIFIED, incremental.error
    assert incremental.stats["objects_uploaded"] == 1
    assert incremental.stats["objects_reused"] == len(incremental.object_keys) - 1
    assert incremental.stats["bytes_hashed"] < 1 << 20  # the unchanged files were not read again
    assert incremental.uploaded_bytes < fast.uploaded_bytes / 10  # one small-file group, not the big chunks


def test_a_damaged_object_makes_the_restore_fall_back_to_restic_and_say_so(machines, s3):
    owner = make_user()
    instance = make_instance(owner, status="running")
    first, second = machines.start(), machines.start()
    _workspace(first.workspace)
    snapshot = _hibernation(owner, instance, first)
    fast = FastPathManifest.objects.get(snapshot=snapshot, status=FastPathManifest.Status.VERIFIED)
    damaged = _object_path(s3, owner, sorted(fast.object_keys)[0])
    body = bytearray(damaged.read_bytes())
    body[len(body) // 2] ^= 0xFF
    damaged.write_bytes(bytes(body))
    events, on_event = _events()

    restore = services.snapshot_restore(owner=owner, instance_id=instance.pk, target=second.target,
                                        on_event=on_event)

    assert restore.status == SnapshotRestore.Status.SUCCEEDED, restore.error
    assert restore.method == "restic" and restore.stats["fastpath_error"]
    assert manifest(second.workspace) == manifest(first.workspace)
    fallback = [message for _, message, data in events if "fastpath_error" in data]
    assert fallback and "restoring with restic instead" in fallback[0]
    assert "X-Amz-Signature" not in restore.stats["fastpath_error"]


def test_a_fast_path_that_cannot_be_stored_leaves_the_restic_snapshot_to_the_wake(machines, settings):
    owner = make_user()
    instance = make_instance(owner, status="running")
    first, second = machines.start(), machines.start()
    make_workspace(first.workspace)
    settings.SNAPSHOT_FAST_S3_ENDPOINT = "http://127.0.0.1:9"  # nothing answers there
    events, on_event = _events()

    snapshot = _hibernation(owner, instance, first, on_event=on_event)

    assert snapshot.status == Snapshot.Status.VERIFIED, snapshot.error  # the hibernation may go on
    fast = FastPathManifest.objects.get(snapshot=snapshot)
    assert fast.status == FastPathManifest.Status.FAILED and fast.error
    assert any("fast path failed" in message and "restic" in message for _, message, _ in events)
    restore = services.snapshot_restore(owner=owner, instance_id=instance.pk, target=second.target)
    assert restore.status == SnapshotRestore.Status.SUCCEEDED and restore.method == "restic"
    assert manifest(second.workspace) == manifest(first.workspace)


def test_only_a_hibernation_or_a_snapshot_asked_with_fast_takes_the_fast_path(machines):
    owner = make_user()
    instance = make_instance(owner, status="running")
    machine = machines.start()
    make_workspace(machine.workspace)

    plain = services.snapshot_take(owner=owner, instance_id=instance.pk, target=machine.target)
    assert plain.status == Snapshot.Status.VERIFIED and not FastPathManifest.objects.filter(snapshot=plain).exists()

    asked = services.snapshot_create(owner=owner, instance_id=instance.pk, target=machine.target, fast=True)
    asked = services.snapshot_run(snapshot_id=asked.pk)
    assert asked.status == Snapshot.Status.VERIFIED
    assert FastPathManifest.objects.get(snapshot=asked).status == FastPathManifest.Status.VERIFIED


def test_retention_keeps_the_newest_fast_path_of_each_instance_and_deletes_what_no_manifest_names(
        machines, s3, settings):
    owner = make_user()
    instance = make_instance(owner, status="running")
    machine = machines.start()
    _workspace(machine.workspace)
    older = _hibernation(owner, instance, machine)
    (machine.workspace / "models" / "big.safetensors").write_bytes(os.urandom(40 << 20))  # both chunks change
    newer = _hibernation(owner, instance, machine)
    older_fast, newer_fast = FastPathManifest.objects.get(snapshot=older), FastPathManifest.objects.get(snapshot=newer)
    assert {older_fast.status, newer_fast.status} == {FastPathManifest.Status.VERIFIED}
    only_older = set(older_fast.object_keys) - set(newer_fast.object_keys)
    assert len(only_older) == 2
    prefix = SnapshotRepository.objects.get(owner=owner).prefix

    settings.SNAPSHOT_FASTPATH_GC_GRACE_SECONDS = 3600  # young objects are never collected
    services.snapshots_apply_retention(owner=owner)
    older_fast.refresh_from_db()
    assert older_fast.status == FastPathManifest.Status.DELETED
    assert only_older <= set(storage.fast_objects(prefix))

    settings.SNAPSHOT_FASTPATH_GC_GRACE_SECONDS = 0
    services.snapshots_apply_retention(owner=owner)

    left = storage.fast_objects(prefix)
    assert not only_older & set(left)
    assert set(newer_fast.object_keys) <= set(left)
    assert set(storage.fast_manifests(prefix)) == {newer_fast.pk}
    # and what is left still restores
    target = machines.start()
    restore = services.snapshot_restore(owner=owner, instance_id=instance.pk, target=target.target)
    assert restore.method == "fastpath", restore.stats
    assert manifest(target.workspace) == manifest(machine.workspace)


def test_a_presync_after_a_periodic_sync_leaves_the_hibernation_only_what_changed_since(machines, settings):
    owner = make_user()
    instance = make_instance(owner, status="running")
    machine, target = machines.start(), machines.start()
    _workspace(machine.workspace)

    presync = services.fastpath_presync(owner=owner, instance_id=instance.pk, target=machine.target)

    assert presync.status == FastPathManifest.Status.VERIFIED, presync.error
    assert presync.snapshot_id is None and presync.uploaded_bytes > 40 << 20
    (machine.workspace / "src" / "pkg" / "module_3.py").write_text("def f3():\n    return 'changed'\n")
    hibernation = _hibernation(owner, instance, machine)
    fast = FastPathManifest.objects.get(snapshot=hibernation)
    assert fast.status == FastPathManifest.Status.VERIFIED, fast.error
    assert fast.stats["objects_uploaded"] == 1 and fast.uploaded_bytes < presync.uploaded_bytes / 10

    # the presync was never a restore source, and it has served its purpose once the hibernation's exists
    settings.SNAPSHOT_FASTPATH_GC_GRACE_SECONDS = 0
    services.snapshots_apply_retention(owner=owner)
    presync.refresh_from_db()
    assert presync.status == FastPathManifest.Status.DELETED
    restore = services.snapshot_restore(owner=owner, instance_id=instance.pk, target=target.target)
    assert restore.method == "fastpath", restore.stats
    assert manifest(target.workspace) == manifest(machine.workspace)


def test_no_presync_while_a_snapshot_of_the_instance_runs_or_with_the_fast_path_off(machines, settings):
    owner = make_user()
    instance = make_instance(owner, status="running")
    machine = machines.start()
    make_workspace(machine.workspace)
    running = services.snapshot_create(owner=owner, instance_id=instance.pk, target=machine.target)

    assert services.fastpath_presync(owner=owner, instance_id=instance.pk, target=machine.target) is None
    Snapshot.objects.filter(pk=running.pk).update(status=Snapshot.Status.FAILED)
    settings.SNAPSHOT_FASTPATH = False
    assert services.fastpath_presync(owner=owner, instance_id=instance.pk, target=machine.target) is None
    assert not FastPathManifest.objects.filter(instance=instance).exists()


def test_a_fast_path_left_pending_by_a_dead_worker_is_failed_and_no_longer_holds_retention_off():
    owner = make_user()
    instance = make_instance(owner, status="running")
    services.repository_ensure(owner=owner)
    stale = FastPathManifest.objects.create(owner=owner, instance=instance)  # a presync whose worker died
    FastPathManifest.objects.filter(pk=stale.pk).update(created_at=timezone.now() - timedelta(days=1))
    fresh = FastPathManifest.objects.create(owner=owner, instance=instance)

    assert services.snapshots_apply_retention(owner=owner).skipped  # one is being written: not now

    fresh.delete()
    result = services.snapshots_apply_retention(owner=owner)
    assert not result.skipped
    stale.refresh_from_db()
    assert stale.status == FastPathManifest.Status.FAILED and "interrupted" in stale.error
