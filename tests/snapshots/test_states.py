"""snapshots.states.status_transition: the one way a snapshot's or a restore's status changes."""

from __future__ import annotations

import pytest

from snapshots.models import Snapshot, SnapshotRestore
from snapshots.states import status_transition
from tests.factories import make_instance

pytestmark = pytest.mark.django_db


def _snapshot(owner, status: str) -> Snapshot:
    return Snapshot.objects.create(owner=owner, instance=make_instance(owner, status="running"), status=status,
                                   ssh_host="127.0.0.1", ssh_port=22, ssh_host_key="ssh-ed25519 AAAA")


def test_rows_move_only_from_a_status_that_allows_the_target(user):
    pending, verified, deleted = (_snapshot(user, s) for s in ("pending", "verified", "deleted"))
    rows = Snapshot.objects.filter(pk__in=[pending.pk, verified.pk, deleted.pk])

    assert status_transition(rows, Snapshot.Status.RUNNING) == 1  # only the pending one may start
    assert status_transition(rows, Snapshot.Status.DELETED, error="gone") == 1  # only the verified one
    assert dict(rows.values_list("pk", "status")) == {pending.pk: "running", verified.pk: "deleted",
                                                      deleted.pk: "deleted"}
    assert Snapshot.objects.get(pk=verified.pk).error == "gone"  # the fields go with the move
    assert status_transition(Snapshot.objects.filter(pk=deleted.pk), Snapshot.Status.VERIFIED) == 0


def test_a_finished_restore_is_never_run_again(user):
    snapshot = _snapshot(user, "verified")
    restore = SnapshotRestore.objects.create(owner=user, snapshot=snapshot, instance=snapshot.instance,
                                             restic_snapshot_id="ab" * 32, ssh_host="127.0.0.1", ssh_port=22,
                                             ssh_host_key="ssh-ed25519 AAAA", status="succeeded")
    assert status_transition(SnapshotRestore.objects.filter(pk=restore.pk), SnapshotRestore.Status.RUNNING) == 0
    assert SnapshotRestore.objects.get(pk=restore.pk).status == "succeeded"
