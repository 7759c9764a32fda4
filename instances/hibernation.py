"""Auto-hibernation, release and wake.

- **Idle**: every heartbeat of the last IDLE_WINDOW_SECONDS says GPU < IDLE_GPU_THRESHOLD_PERCENT, *and*
  heartbeats came throughout the window (no gap over HEARTBEAT_MAX_GAP_SECONDS, none missing at either
  end). Missing heartbeats are never idleness; a single sample at or above the threshold resets the clock;
  keep-awake-until suspends it.
- **Hibernate** = verified snapshot -> destroy the machine -> `hibernated`. If the snapshot fails, the
  machine is not touched, the instance goes back to `running` and the next try waits (backoff). The
  destroy happens only after a verified hibernation snapshot of this hibernation exists, so a worker killed
  at any point never leaves a destroyed machine without one: the resumed task finds the snapshot (or takes
  it again) first.
- **Release**: after HIBERNATION_RELEASE_SECONDS hibernated, any provider resource left under the instance's
  label is destroyed and the repository keeps only the latest verified snapshot of the instance.
- **Wake**: a launch race (preferring the last host), then the latest verified snapshot restored onto the
  winner, then the agent; `running` when the workspace is back. Every step is timed in a `wake` event.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from dumont.core.locks import advisory_lock
from instances import agent_setup
from instances.lifecycle import MACHINE_FIELDS_CLEARED, instance_locked
from instances.models import Instance, InstanceEvent
from instances.race import race_locked
from instances.services import instance_event_add
from instances.states import Status, transition
from machines.clients import provider_client
from machines.providers.base import ProviderError
from snapshots import services as snapshot_services
from snapshots.models import Snapshot

log = logging.getLogger(__name__)


# ---- idleness ------------------------------------------------------------------------------


def is_idle(samples: Sequence[tuple[datetime, float | None]], *, now: datetime, window: float, threshold: float,
            max_gap: float) -> bool:
    """Whether these heartbeats (received_at, gpu_util) prove the GPU idle for the whole window."""
    start = now - timedelta(seconds=window)
    in_window = sorted((at, util) for at, util in samples if at >= start)
    if not in_window:
        return False
    times = [start, *(at for at, _ in in_window), now]
    if any((later - earlier).total_seconds() > max_gap for earlier, later in zip(times, times[1:], strict=False)):
        return False  # a gap in heartbeats is not idleness
    return all(util is not None and util < threshold for _, util in in_window)


def instance_is_idle(instance: Instance, *, now: datetime | None = None) -> bool:
    from agent import selectors as agent_selectors

    now = now or timezone.now()
    if instance.keep_awake_until and instance.keep_awake_until > now:
        return False
    window = settings.IDLE_WINDOW_SECONDS
    samples = agent_selectors.heartbeats_window(instance.pk, window)
    return is_idle(samples, now=now, window=window, threshold=settings.IDLE_GPU_THRESHOLD_PERCENT,
                   max_gap=settings.HEARTBEAT_MAX_GAP_SECONDS)


def _retry_allowed(instance: Instance, now: datetime) -> bool:
    """After failed hibernations, wait 1, 2, 4... minutes (capped) before trying again."""
    failures = 0
    last_failure = None
    for event in instance.events.filter(kind=InstanceEvent.Kind.HIBERNATE).order_by("-id")[:10]:
        if not event.data.get("failed"):
            break
        failures += 1
        last_failure = last_failure or event.created_at
    if not failures:
        return True
    backoff = min(settings.HIBERNATE_RETRY_BASE_SECONDS * 2 ** (failures - 1), settings.HIBERNATE_RETRY_MAX_SECONDS)
    return now - last_failure >= timedelta(seconds=backoff)


def instances_idle(*, now: datetime | None = None, batch_size: int = 500) -> list[int]:
    """Running instances whose GPU proved idle for the whole window (and whose retry backoff passed)."""
    now = now or timezone.now()
    window_start = now - timedelta(seconds=settings.IDLE_WINDOW_SECONDS)
    candidates = Instance.objects.filter(status=Status.RUNNING, status_changed_at__lte=window_start).filter(
        Q(keep_awake_until__isnull=True) | Q(keep_awake_until__lte=now)
    ).order_by("id")[:batch_size]
    return [i.pk for i in candidates if instance_is_idle(i, now=now) and _retry_allowed(i, now)]


def instances_to_release(*, now: datetime | None = None, batch_size: int = 500) -> list[int]:
    now = now or timezone.now()
    release_before = now - timedelta(seconds=settings.HIBERNATION_RELEASE_SECONDS)
    return list(Instance.objects.filter(status=Status.HIBERNATED, released_at__isnull=True,
                                        status_changed_at__lte=release_before)
                .order_by("id").values_list("id", flat=True)[:batch_size])


def hibernation_sweep(*, batch_size: int = 500) -> dict:
    """Periodic (beat): hibernate idle instances, release long-hibernated ones. Bounded and idempotent;
    two beats running at once do nothing twice (an advisory lock, and each task re-checks under the
    instance's lock)."""
    from instances import tasks

    with advisory_lock("hibernation-sweep", 0) as acquired:
        if not acquired:
            return {"skipped": True}
        idle = instances_idle(batch_size=batch_size)
        for instance_id in idle:
            tasks.hibernate_instance.delay(instance_id, "idle")
        released = instances_to_release(batch_size=batch_size)
        for instance_id in released:
            tasks.release_instance.delay(instance_id)
        return {"hibernating": idle, "releasing": released}


# ---- hibernate -----------------------------------------------------------------------------


def events_for(instance: Instance):
    def on_event(kind: str, message: str, data: dict) -> None:
        instance_event_add(instance=instance, kind=kind, message=message, data=data)

    return on_event


def _hibernation_snapshot(instance: Instance) -> Snapshot:
    """The verified snapshot of *this* hibernation: found (a resumed task), resumed, or taken now."""
    ours = Snapshot.objects.filter(instance=instance, reason=Snapshot.Reason.HIBERNATE,
                                   created_at__gte=instance.status_changed_at)
    verified = ours.filter(status=Snapshot.Status.VERIFIED).order_by("-id").first()
    if verified:
        return verified
    on_event = events_for(instance)
    unfinished = Snapshot.objects.filter(instance=instance, status__in=Snapshot.ACTIVE).order_by("-id").first()
    if unfinished:  # its worker died mid-backup: run it again
        return snapshot_services.snapshot_run(snapshot_id=unfinished.pk, on_event=on_event)
    return snapshot_services.snapshot_take(owner=instance.owner, instance_id=instance.pk, target=instance.ssh_target,
                                           reason=Snapshot.Reason.HIBERNATE, on_event=on_event)


def instance_hibernate_run(instance_id: int, *, reason: str = "idle") -> str:
    with instance_locked(instance_id) as instance:
        if instance.status == Status.RUNNING:
            instance = transition(instance.pk, Status.HIBERNATING, expected=Status.RUNNING,
                                  message=f"hibernating ({reason})", data={"reason": reason})
        elif instance.status != Status.HIBERNATING:
            return "skipped"
        started = time.monotonic()
        snapshot = _hibernation_snapshot(instance)
        if snapshot.status != Snapshot.Status.VERIFIED:
            instance_event_add(instance=instance, kind=InstanceEvent.Kind.HIBERNATE,
                               message=f"hibernation aborted, the machine keeps running: {snapshot.error}",
                               data={"failed": True, "snapshot": snapshot.pk})
            transition(instance.pk, Status.RUNNING, expected=Status.HIBERNATING,
                       message="hibernation aborted: the snapshot failed",
                       data={"price_per_hour": str(instance.price_per_hour or 0), "gpu_name": instance.gpu_name})
            return "snapshot-failed"
        # only now, with a verified snapshot, may the machine go
        provider = provider_client(instance.provider, instance.provider_account)
        provider.destroy(instance.provider_instance_id)
        seconds = round(time.monotonic() - started, 3)
        transition(
            instance.pk, Status.HIBERNATED, expected=Status.HIBERNATING,
            message=f"hibernated: snapshot {snapshot.restic_snapshot_id[:8]} verified, machine destroyed",
            data={"price_per_hour": str(instance.price_per_hour or 0), "gpu_name": instance.gpu_name,
                  "host_id": instance.host_id, "snapshot": snapshot.pk, "seconds": seconds},
            **MACHINE_FIELDS_CLEARED,
        )
        instance_event_add(instance=instance, kind=InstanceEvent.Kind.HIBERNATE, message="hibernated",
                           data={"snapshot": snapshot.pk, "seconds": seconds})
        _standby_destroy(instance)
        return "hibernated"


def _standby_destroy(instance: Instance) -> None:
    """The snapshot is enough: the standby goes too. A refusal is retried by the standby sweep."""
    from instances.standby import standby_destroy

    try:
        standby_destroy(instance, reason="instance hibernated")
    except ProviderError as exc:
        instance_event_add(instance=instance, kind=InstanceEvent.Kind.ERROR,
                           message=f"the standby could not be destroyed yet: {exc}")


def instance_release_run(instance_id: int) -> str:
    with instance_locked(instance_id) as instance:
        if instance.status != Status.HIBERNATED or instance.released_at:
            return "skipped"
        provider = provider_client(instance.provider, instance.provider_account)
        leftovers = [m.instance_id for m in provider.list(label_prefix=f"{instance.label}-")]
        for machine_id in leftovers:
            provider.destroy(machine_id)
        forgotten = snapshot_services.snapshots_keep_latest(owner=instance.owner, instance_id=instance.pk)
        Instance.objects.filter(pk=instance.pk).update(released_at=timezone.now())
        instance_event_add(
            instance=instance, kind=InstanceEvent.Kind.HIBERNATE,
            message=f"reservation released: {len(leftovers)} machine(s) destroyed, {forgotten} older snapshot(s) "
                    "forgotten; only the latest verified snapshot remains",
            data={"destroyed": leftovers, "forgotten": forgotten},
        )
        return "released"


# ---- wake ----------------------------------------------------------------------------------


def instance_wake_run(instance_id: int) -> str:
    with instance_locked(instance_id) as instance:
        if instance.status != Status.WAKING:
            return "skipped"
        began = instance.status_changed_at
        timings: dict[str, float] = {}
        if not instance.provider_instance_id:
            started = time.monotonic()
            outcome = race_locked(instance.pk, prefer_host=_last_host(instance))
            timings["race"] = round(time.monotonic() - started, 3)
            if outcome != "won":
                return outcome  # the race already sent the instance back to hibernated (or it was destroyed)
            instance.refresh_from_db()
        started = time.monotonic()
        restore = snapshot_services.snapshot_restore(owner=instance.owner, instance_id=instance.pk,
                                                     target=instance.ssh_target, on_event=events_for(instance))
        timings["restore"] = round(time.monotonic() - started, 3)
        if restore.status != restore.Status.SUCCEEDED:
            provider = provider_client(instance.provider, instance.provider_account)
            provider.destroy(instance.provider_instance_id)
            transition(instance.pk, Status.HIBERNATED, expected=Status.WAKING,
                       message=f"wake failed, back to hibernated (snapshot intact): restore failed: {restore.error}",
                       **MACHINE_FIELDS_CLEARED)
            return "restore-failed"
        started = time.monotonic()
        agent_setup.agent_start(instance)
        timings["agent"] = round(time.monotonic() - started, 3)
        timings["total"] = round((timezone.now() - began).total_seconds(), 3)
        transition(instance.pk, Status.RUNNING, expected=Status.WAKING,
                   message=f"awake on {instance.host_id} in {timings['total']:.1f}s",
                   data={"price_per_hour": str(instance.price_per_hour or 0), "gpu_name": instance.gpu_name,
                         "timings": timings})
        instance_event_add(instance=instance, kind=InstanceEvent.Kind.WAKE,
                           message=f"workspace restored and agent running in {timings['total']:.1f}s",
                           data={"timings": timings, "restore": restore.pk})
        return "running"


def _last_host(instance: Instance) -> str:
    event = instance.events.filter(kind=InstanceEvent.Kind.STATUS, data__to=Status.HIBERNATED).order_by("-id").first()
    return (event.data.get("host_id") or "") if event else ""
