"""Reads of the agent app, for the hibernation work: what did an instance's GPUs do lately?

Heartbeats reach PostgreSQL through a Redis buffer flushed every AGENT_FLUSH_INTERVAL_SECONDS
(services.heartbeats_flush); `heartbeats_window` reads PostgreSQL only, so its newest few seconds may
not be there yet. That can only look like a gap at the end of the window, and gaps are never idleness:
a caller that decides "idle" must require heartbeats *throughout* the window (no gap longer than a few
heartbeat intervals, none at its start or end), and every reading below its threshold (a `None` reading
is not idle). The same rule makes heartbeats lost in a Redis crash read as a gap. A caller that wants
the freshest data runs `services.heartbeats_flush()` first (cheap: one sweep for all instances).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from django.db.models import Max
from django.utils import timezone

from agent import buffer
from agent.models import Heartbeat


def heartbeats_window(instance_id: int, seconds: float) -> list[tuple[datetime, float | None]]:
    """(received_at, gpu_util or None for "no reading") of the last `seconds`, oldest first."""
    since = timezone.now() - timedelta(seconds=seconds)
    rows = (
        Heartbeat.objects.filter(instance_id=instance_id, received_at__gte=since)
        .order_by("received_at")
        .values_list("received_at", "gpu_util")
    )
    return list(rows)


def latest_heartbeat(instance_id: int) -> dict[str, Any] | None:
    """The instance's latest heartbeat as buffered in Redis (flushed or not): `received_at`, `gpu_util`,
    `gpu_metrics`, `sync`, `agent_state`; None if Redis has none (never sent, expired, or Redis lost it)."""
    record = buffer.latest(instance_id)
    if record is None:
        return None
    return {
        "received_at": datetime.fromtimestamp(record["r"], tz=UTC), "gpu_util": record["u"],
        "gpu_metrics": record["m"], "sync": record["s"] or {}, "agent_state": record["a"],
    }


def last_heartbeat_at(instance_id: int) -> datetime | None:
    """When the instance's agent last got through: Redis first (fresh), else PostgreSQL."""
    latest = latest_heartbeat(instance_id)
    if latest is not None:
        return latest["received_at"]
    row = Heartbeat.objects.filter(instance_id=instance_id).order_by("-received_at").values_list(
        "received_at", flat=True
    ).first()
    return row


def last_heartbeats_at(instance_ids: list[int]) -> dict[int, datetime]:
    """`last_heartbeat_at` for many instances: one Redis MGET, one query for those Redis lacks.
    Instances that never got a heartbeat through are left out."""
    found = {i: datetime.fromtimestamp(r["r"], tz=UTC) for i, r in buffer.latest_many(instance_ids).items()}
    missing = [i for i in instance_ids if i not in found]
    if missing:
        rows = (Heartbeat.objects.filter(instance_id__in=missing).values("instance_id")
                .annotate(last=Max("received_at")).values_list("instance_id", "last"))
        found.update(dict(rows))
    return found
