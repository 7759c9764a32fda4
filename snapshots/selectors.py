"""Reads of the snapshots app. Every read is scoped to its owner: another user's id is a 404."""

from __future__ import annotations

import hashlib
from datetime import timedelta

from django.utils import timezone

from dumont.core.errors import NotFound
from machines.ssh import SSHTarget
from snapshots.models import FastPathManifest, MachineKey, Snapshot, SnapshotRestore


def snapshots_of(user):
    return Snapshot.objects.filter(owner=user).exclude(status=Snapshot.Status.DELETED).select_related("fastpath")


def snapshot_of(*, user, snapshot_id: int) -> Snapshot:
    snapshot = snapshots_of(user).filter(pk=snapshot_id).first()
    if snapshot is None:
        raise NotFound(f"No snapshot {snapshot_id}.")
    return snapshot


def snapshot_latest_verified(*, instance_id: int) -> Snapshot | None:
    """What a wake restores: the newest verified snapshot of the instance, by the time its backup
    captured the workspace (not when it was recorded: a periodic sync is recorded up to a minute late)."""
    return (
        Snapshot.objects.filter(instance_id=instance_id, status=Snapshot.Status.VERIFIED)
        .order_by(*Snapshot.NEWEST_FIRST).first()
    )


def restores_of(user):
    return SnapshotRestore.objects.filter(owner=user)


def machine_name(target: SSHTarget) -> str:
    """A machine's name for its restic keys: the sha256 of its pinned SSH host key (a new machine has a new
    one); "" for a machine with none."""
    return hashlib.sha256(target.host_key.strip().encode()).hexdigest() if target.host_key else ""


def machine_key_ready(*, instance_id: int, target: SSHTarget) -> bool:
    """Whether the machine's own restic key is in its repository already (else making it takes seconds)."""
    name = machine_name(target)
    return bool(name) and MachineKey.objects.filter(instance_id=instance_id, machine=name, revoked_at__isnull=True
                                                    ).exclude(restic_key_id="").exists()


def fastpath_presync_due(instance_ids, *, older_than_seconds: float) -> list[int]:
    """Of these instances, those whose newest fast path (a snapshot's or a presync, whatever became of it) was
    started more than `older_than_seconds` ago, or that have none: a presync after their periodic sync keeps the
    next hibernation's upload small, and a failed one is not retried sooner."""
    cutoff = timezone.now() - timedelta(seconds=older_than_seconds)
    recent = set(FastPathManifest.objects.filter(instance_id__in=instance_ids, created_at__gte=cutoff)
                 .values_list("instance_id", flat=True))
    return sorted(set(instance_ids) - recent)
