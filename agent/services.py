from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from agent.models import Heartbeat


def heartbeats_prune(
    *, older_than: timedelta | None = None, batch_size: int | None = None, max_batches: int | None = None
) -> int:
    """Delete old heartbeats in batches (short transactions, no long lock on a big table).

    Stops after `max_batches`: the next periodic run continues, so one run stays bounded.
    Returns how many rows were deleted.
    """
    older_than = older_than or timedelta(hours=settings.HEARTBEAT_RETENTION_HOURS)
    batch_size = batch_size or settings.HEARTBEAT_PRUNE_BATCH_SIZE
    max_batches = max_batches or settings.HEARTBEAT_PRUNE_MAX_BATCHES
    cutoff = timezone.now() - older_than
    deleted = 0
    for _ in range(max_batches):
        ids = list(Heartbeat.objects.filter(received_at__lt=cutoff).order_by("id").values_list("id", flat=True)[:batch_size])
        if not ids:
            break
        deleted += Heartbeat.objects.filter(id__in=ids).delete()[0]
    return deleted
