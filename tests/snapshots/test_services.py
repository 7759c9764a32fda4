"""The snapshot services end to end: real restic, a real S3 server, real SSH into sshd machines."""

from __future__ import annotations

import filecmp

import pytest

from machines.ssh import connect
from snapshots import restic, services
from snapshots.models import Snapshot, SnapshotRestore
from tests.factories import make_instance, make_user
from tests.snapshots.helpers import UNICODE_NAME, install_restic_wrapper, make_workspace, manifest

pytestmark = pytest.mark.django_db


def _running_instance(owner):
    return make_instance(owner, status="running")


def test_a_backup_restored_onto_another_machine_is_identical_and_the_next_backup_reuses_it(machines):
    owner = make_user()
    instance = _running_instance(owner)
    first, second = machines.start(), machines.start()
    make_workspace(first.workspace)
    events: list[tuple[str, str, dict]] = []

    snapshot = services.snapshot_take(owner=owner, instance_id=instance.pk, target=first.target,
                                      on_event=lambda *event: events.append(event))

    assert snapshot.status == Snapshot.Status.VERIFIED, snapshot.error
    assert snapshot.verified_at is not None and len(snapshot.restic_snapshot_id) == 64
    assert snapshot.file_count == len([e for e in manifest(first.workspace).values() if e[0] == "file"])
    assert snapshot.size_bytes > 2 << 20 and snapshot.added_bytes > 0 and snapshot.duration_seconds > 0
    assert snapshot.stats["installed_restic"] is True  # a fresh machine got the control plane's restic
    assert [message.split(":")[0] for _, message, _ in events][-1] == f"snapshot {snapshot.pk} verified"

    restore = services.snapshot_restore(owner=owner, instance_id=instance.pk, target=second.target)

    assert restore.status == SnapshotRestore.Status.SUCCEEDED, restore.error
    assert restore.snapshot_id == snapshot.pk
    restored = manifest(second.workspace)
    assert restored == manifest(first.workspace)
    assert UNICODE_NAME in restored and restored["empty dir/nested empty"][0] == "dir"
    assert restored["latest.bin"] == ("symlink", "models/weights.bin")

    # the first backup after a restore starts from the restored snapshot and re-reads nothing
    (second.workspace / "notes.txt").write_text("one new file\n")
    incremental = services.snapshot_take(owner=owner, instance_id=instance.pk, target=second.target,
                                         reason=Snapshot.Reason.PERIODIC)

    assert incremental.status == Snapshot.Status.VERIFIED, incremental.error
    assert incremental.parent_restic_snapshot_id == snapshot.restic_snapshot_id
    assert incremental.stats["after_restore"] is True
    assert incremental.stats["files_new"] == 1 and incremental.stats["files_changed"] == 0
    assert incremental.stats["files_unmodified"] == snapshot.file_count
    assert incremental.added_bytes < 64 << 10  # the weights were not stored again
    assert incremental.stats["installed_restic"] is False  # the restore installed it already


def test_restic_of_another_version_on_a_machine_is_replaced_by_the_control_planes(machines, control_key):
    machine = machines.start()
    install_restic_wrapper(machine, 'echo "restic 0.9.6 compiled with go1.13.4 on linux/amd64"')
    binary = services.restic_binary()

    with connect(machine.target, control_key) as session:
        assert restic.restic_ensure(session, local_binary=binary) is True
        assert restic.restic_ensure(session, local_binary=binary) is False

    assert filecmp.cmp(machine.restic, binary, shallow=False)
    assert machine.restic.stat().st_mode & 0o777 == 0o755
    assert [p.name for p in machine.restic.parent.iterdir()] == ["restic"]  # no temporary file left
