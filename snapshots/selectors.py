"""Reads of the snapshots app. Every read is scoped to its owner: another user's id is a 404."""

from __future__ import annotations

from dumont.core.errors import NotFound
from snapshots.models import Snapshot, SnapshotRestore


def snapshots_of(user):
    return Snapshot.objects.filter(owner=user).exclude(status=Snapshot.Status.DELETED)


def snapshot_of(*, user, snapshot_id: int) -> Snapshot:
    snapshot = snapshots_of(user).filter(pk=snapshot_id).first()
    if snapshot is None:
        raise NotFound(f"No snapshot {snapshot_id}.")
    return snapshot


def snapshot_latest_verified(*, instance_id: int) -> Snapshot | None:
    """What a wake restores: the newest verified snapshot of the instance."""
    return (
        Snapshot.objects.filter(instance_id=instance_id, status=Snapshot.Status.VERIFIED)
        .order_by("-finished_at", "-id").first()
    )


def restores_of(user):
    return SnapshotRestore.objects.filter(owner=user)
