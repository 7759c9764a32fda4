"""A snapshot counts only when restic succeeded and the repository lists it; every failure is
recorded as such, with a reason a user can act on, and never as verified."""

from __future__ import annotations

import dataclasses
import os
import shutil

import pytest
from django.conf import settings

from dumont.core.errors import Conflict
from machines.providers.local.sshd import free_port
from snapshots import restic, services
from snapshots.models import Snapshot, SnapshotRepository
from tests.factories import make_instance, make_user
from tests.snapshots.helpers import install_restic_wrapper, make_workspace

pytestmark = pytest.mark.django_db


def _running_instance(owner):
    return make_instance(owner, status="running")


@pytest.fixture(scope="module")
def failing_machine(machines):
    """One machine for the failure cases that leave the workspace intact."""
    machine = machines.start()
    make_workspace(machine.workspace, weights_mb=1, source_files=5)
    return machine


def assert_failed(snapshot: Snapshot, *expected: str) -> None:
    assert snapshot.status == Snapshot.Status.FAILED
    assert snapshot.verified_at is None and snapshot.finished_at is not None
    for text in expected:
        assert text in snapshot.error, snapshot.error


def test_a_wrong_repository_password_fails_the_snapshot_with_restics_reason(failing_machine):
    owner = make_user()
    services.repository_ensure(owner=owner)
    SnapshotRepository.objects.filter(owner=owner).update(password="not-the-password")

    snapshot = services.snapshot_take(owner=owner, instance_id=_running_instance(owner).pk,
                                      target=failing_machine.target)

    assert_failed(snapshot, "wrong password")
    assert snapshot.restic_snapshot_id == ""


def test_an_unreachable_machine_fails_the_snapshot_before_anything_runs(failing_machine):
    owner = make_user()
    target = dataclasses.replace(failing_machine.target, port=free_port())

    snapshot = services.snapshot_take(owner=owner, instance_id=_running_instance(owner).pk, target=target)

    assert_failed(snapshot, "SSH", "cannot connect")
    assert not SnapshotRepository.objects.filter(owner=owner).exists()


def test_an_ssh_connection_dropped_mid_backup_fails_the_snapshot(machines):
    owner = make_user()
    machine = machines.start()
    (machine.workspace / "big.bin").write_bytes(os.urandom(40 << 20))  # long enough to cut it halfway
    dropped: list[float] = []

    def drop_on_first_progress(kind: str, message: str, data: dict) -> None:
        if "percent" in data and not dropped:
            dropped.append(data["percent"])
            machine.handle.stop()  # the listener and the session's sshd: the connection dies

    snapshot = services.snapshot_take(owner=owner, instance_id=_running_instance(owner).pk,
                                      target=machine.target, on_event=drop_on_first_progress)

    assert dropped and dropped[0] < 100
    assert_failed(snapshot, "SSH", "lost")


def test_an_incomplete_backup_exit_3_is_a_failure_and_retention_forgets_it(machines):
    owner = make_user()
    machine = machines.start()
    make_workspace(machine.workspace, weights_mb=1, source_files=5)
    # restic really backs up, then reports what it does when files could not be read (exit 3)
    install_restic_wrapper(machine, f'{shutil.which("restic")} "$@" || exit $?\n'
                                    'case " $* " in *" backup "*) echo "error: open secret: permission denied" >&2; exit 3;; esac')

    snapshot = services.snapshot_take(owner=owner, instance_id=_running_instance(owner).pk, target=machine.target)

    assert_failed(snapshot, "exit 3", "incomplete", "permission denied")
    assert snapshot.restic_snapshot_id  # restic saved it: it must be forgotten, never restored
    repository = services._control_plane_repository(SnapshotRepository.objects.get(owner=owner))
    listed = restic.snapshots(services._local_runner(), repository, services.tuning())
    assert [s["short_id"] for s in listed] == [snapshot.restic_snapshot_id[:8]]
    with pytest.raises(Conflict):
        services.restore_create(owner=owner, snapshot_id=snapshot.pk, instance_id=snapshot.instance_id,
                                target=machine.target)

    result = services.snapshots_apply_retention(owner=owner)

    assert result.forgotten == [snapshot.restic_snapshot_id]
    assert restic.snapshots(services._local_runner(), repository, services.tuning()) == []
    snapshot.refresh_from_db()
    assert snapshot.forgotten_at is not None and snapshot.status == Snapshot.Status.FAILED


def test_a_repository_whose_key_is_stored_is_never_initialized_twice(failing_machine, monkeypatch):
    """A worker killed during `restic init` leaves a key behind, with `initialized_at` unset and maybe no
    config yet. The retry must not store a second master key (the repository would then fail to open
    with the first: "config or key ... is damaged"); a dead init's lone key is cleared, then init."""
    from snapshots import storage

    owner = make_user()
    repository = services.repository_ensure(owner=owner)
    SnapshotRepository.objects.filter(owner=owner).update(initialized_at=None)
    keys = [o["Key"] for o in storage._keys_under(f"{repository.prefix}/keys")]
    assert len(keys) == 1
    services.repository_ensure(owner=owner)  # key and config there: used as it is
    assert [o["Key"] for o in storage._keys_under(f"{repository.prefix}/keys")] == keys

    # killed between the key and the config
    SnapshotRepository.objects.filter(owner=owner).update(initialized_at=None)
    storage.client().delete_object(Bucket=settings.SNAPSHOT_S3_BUCKET, Key=f"{repository.prefix}/config")
    monkeypatch.setattr(services, "INIT_WAIT_SECONDS", 1.0)
    services.repository_ensure(owner=owner)
    assert len(list(storage._keys_under(f"{repository.prefix}/keys"))) == 1
    assert SnapshotRepository.objects.get(owner=owner).initialized_at is not None
    snapshot = services.snapshot_take(owner=owner, instance_id=_running_instance(owner).pk,
                                      target=failing_machine.target)
    assert snapshot.status == Snapshot.Status.VERIFIED, snapshot.error


def test_a_control_plane_without_restic_fails_the_snapshot_saying_how_to_install_it(failing_machine, settings,
                                                                                      monkeypatch, tmp_path):
    settings.SNAPSHOT_RESTIC_BINARY = ""
    monkeypatch.setenv("PATH", str(tmp_path))  # restic out of sight, as on a machine that lacks it
    owner = make_user()

    snapshot = services.snapshot_take(owner=owner, instance_id=_running_instance(owner).pk,
                                      target=failing_machine.target)

    assert_failed(snapshot, "restic is not installed", "sudo apt-get install -y restic")
