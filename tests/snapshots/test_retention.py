"""Retention keeps what a wake or a user needs and forgets (and prunes) the rest, in restic too."""

from __future__ import annotations

import pytest

from snapshots import restic, services
from snapshots.models import Snapshot, SnapshotRepository
from tests.factories import make_instance, make_user
from tests.snapshots.helpers import make_workspace

pytestmark = pytest.mark.django_db


def _running_instance(owner):
    return make_instance(owner, status="running")


def test_retention_keeps_the_newest_manual_and_counted_snapshots_and_forgets_the_rest(machines, settings):
    settings.SNAPSHOT_KEEP_PERIODIC = 0
    settings.SNAPSHOT_KEEP_HIBERNATE = 1
    owner = make_user()
    instance, other_instance = _running_instance(owner), _running_instance(owner)
    machine = machines.start()
    make_workspace(machine.workspace, weights_mb=0, source_files=3)
    Reason = Snapshot.Reason
    taken = []
    for number, reason in enumerate([Reason.PERIODIC, Reason.HIBERNATE, Reason.HIBERNATE, Reason.MANUAL,
                                     Reason.PERIODIC]):
        (machine.workspace / "counter").write_text(str(number))
        taken.append(services.snapshot_take(owner=owner, instance_id=instance.pk, target=machine.target,
                                            reason=reason))
    other = services.snapshot_take(owner=owner, instance_id=other_instance.pk, target=machine.target,
                                   reason=Reason.PERIODIC)
    periodic_1, hibernate_1, hibernate_2, manual, periodic_2 = taken
    assert {s.status for s in [*taken, other]} == {Snapshot.Status.VERIFIED}
    services.snapshot_delete(owner=owner, snapshot_id=manual.pk)  # the user's own choice

    result = services.snapshots_apply_retention(owner=owner)

    assert sorted(result.expired) == sorted([periodic_1.pk, hibernate_1.pk])
    gone = {periodic_1, hibernate_1, manual}
    assert result.forgotten == sorted(s.restic_snapshot_id for s in gone)
    repository = SnapshotRepository.objects.get(owner=owner)
    listed = restic.snapshots(services._local_runner(), services._control_plane_repository(repository),
                              services.tuning())
    # kept: the newest (even periodic, with none to keep), the newest hibernation, each instance's newest
    assert {s["id"] for s in listed} == {s.restic_snapshot_id for s in (hibernate_2, periodic_2, other)}
    for snapshot in gone:
        snapshot.refresh_from_db()
        assert snapshot.status == Snapshot.Status.DELETED and snapshot.forgotten_at is not None
    assert repository.size_bytes > 0 and repository.size_measured_at and repository.pruned_at

    again = services.snapshots_apply_retention(owner=owner)
    assert again.expired == [] and again.forgotten == []

    # a released hibernation keeps the instance's newest snapshot only
    assert services.snapshots_keep_latest(owner=owner, instance_id=instance.pk) == 1
    listed = restic.snapshots(services._local_runner(), services._control_plane_repository(repository),
                              services.tuning())
    assert {s["id"] for s in listed} == {periodic_2.restic_snapshot_id, other.restic_snapshot_id}
    assert services.snapshots_keep_latest(owner=owner, instance_id=instance.pk) == 0
