"""Celery tasks: ids in, never secrets or model objects (task arguments sit readable in Redis).

Each is idempotent (the service locks the row and checks its status) and its time limits stay below
the broker's visibility timeout, so a task is never handed to a second worker while it runs.
"""

from __future__ import annotations

from celery import shared_task
from django.conf import settings
from django.contrib.auth import get_user_model

from snapshots import services, signals
from snapshots.models import Snapshot, SnapshotRepository, SnapshotRestore

_LIMITS = {"soft_time_limit": settings.SNAPSHOT_TASK_SOFT_TIME_LIMIT, "time_limit": settings.SNAPSHOT_TASK_TIME_LIMIT}


@shared_task(ignore_result=True, **_LIMITS)
def take_snapshot(snapshot_id: int) -> None:
    instance_id = Snapshot.objects.values_list("instance_id", flat=True).get(pk=snapshot_id)
    services.snapshot_run(snapshot_id=snapshot_id, on_event=signals.emitter(instance_id))


@shared_task(ignore_result=True, **_LIMITS)
def restore_snapshot(restore_id: int) -> None:
    instance_id = SnapshotRestore.objects.values_list("instance_id", flat=True).get(pk=restore_id)
    services.restore_run(restore_id=restore_id, on_event=signals.emitter(instance_id))


@shared_task(ignore_result=True, **_LIMITS)
def apply_retention(owner_id: int) -> None:
    services.snapshots_apply_retention(owner=get_user_model().objects.get(pk=owner_id))


@shared_task(ignore_result=True)
def remove_machine_keys() -> int:
    """Delete the key files of machines that went (revoked keys); the retention sweep retries failures."""
    return services.machine_keys_remove()


@shared_task(ignore_result=True)
def apply_retention_all() -> int:
    """Periodic: revoked machine keys removed, then one retention task per user with a repository, least
    recently measured first (bounded)."""
    remove_machine_keys.apply_async(expires=settings.SNAPSHOT_RETENTION_INTERVAL_SECONDS)
    owners = list(
        SnapshotRepository.objects.filter(initialized_at__isnull=False)
        .order_by("size_measured_at", "pk").values_list("owner_id", flat=True)[: settings.SNAPSHOT_RETENTION_BATCH_SIZE]
    )
    for owner_id in owners:
        apply_retention.apply_async((owner_id,), expires=settings.SNAPSHOT_RETENTION_INTERVAL_SECONDS)
    return len(owners)
