"""Reads of the instances app. What the API reads is scoped to its owner (another user's id is a 404);
the sweeps' reads (idle, to release, silent, standbys) span every owner and return ids."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db.models import OuterRef, Prefetch, Q, Subquery
from django.utils import timezone

from dumont.core.errors import NotFound
from dumont.core.loops import each_on_its_own
from instances.choices import Status
from instances.models import Instance, InstanceEvent, StandbyConfig, StandbyMachine


def instances_of(user):
    # the live standby comes along: the API shows its SSH endpoint during a failover
    live = StandbyMachine.objects.filter(status__in=StandbyMachine.ACTIVE)
    # a client follows what happens next from the latest event on (`events?after=`)
    latest_event = InstanceEvent.objects.filter(instance=OuterRef("pk")).order_by("-id").values("id")[:1]
    return (Instance.objects.filter(owner=user).annotate(last_event_id=Subquery(latest_event))
            .prefetch_related(Prefetch("standbys", queryset=live, to_attr="live_standbys")))


def instance_of(*, user, instance_id: int) -> Instance:
    instance = instances_of(user).filter(pk=instance_id).first()
    if instance is None:
        raise NotFound(f"No instance {instance_id}.")
    return instance


def instance_events(*, instance: Instance, after_id: int | None = None, limit: int = 500):
    events = InstanceEvent.objects.filter(instance=instance)
    if after_id is not None:
        events = events.filter(pk__gt=after_id)
    return events.order_by("id")[:limit]


def instance_last_event_id(instance: Instance, *, annotated: bool = False) -> int | None:
    if annotated and hasattr(instance, "last_event_id"):  # by instances_of, for a listing
        return instance.last_event_id
    return InstanceEvent.objects.filter(instance=instance).order_by("-id").values_list("id", flat=True).first()


def standby_config_of(user) -> StandbyConfig:
    """The user's standby settings; defaults (disabled) when never saved."""
    return StandbyConfig.objects.filter(owner=user).first() or StandbyConfig(owner=user)


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
    idle = []
    for instance in candidates:
        with each_on_its_own("judging idleness", f"instance {instance.pk}"):
            if instance_is_idle(instance, now=now) and _retry_allowed(instance, now):
                idle.append(instance.pk)
    return idle


def instances_to_release(*, now: datetime | None = None, batch_size: int = 500) -> list[int]:
    now = now or timezone.now()
    release_before = now - timedelta(seconds=settings.HIBERNATION_RELEASE_SECONDS)
    return list(Instance.objects.filter(status=Status.HIBERNATED, released_at__isnull=True,
                                        status_changed_at__lte=release_before)
                .order_by("id").values_list("id", flat=True)[:batch_size])


def instances_silent(*, now: datetime | None = None, chunk: int = 1000, seconds: float | None = None) -> list[int]:
    """Running instances whose heartbeats stopped for longer than `seconds` (LOST_MACHINE_SECONDS) (or never
    came, that long after the machine started). Cheap: one Redis MGET per `chunk` instances."""
    from agent.selectors import last_heartbeats_at

    now = now or timezone.now()
    threshold = now - timedelta(seconds=settings.LOST_MACHINE_SECONDS if seconds is None else seconds)
    running = list(Instance.objects.filter(status=Status.RUNNING, status_changed_at__lte=threshold)
                   .order_by("id").values_list("id", flat=True))
    silent = []
    for start in range(0, len(running), chunk):
        ids = running[start:start + chunk]
        last = last_heartbeats_at(ids)
        silent += [i for i in ids if last.get(i) is None or last[i] < threshold]
    return silent


def active_standby(instance_id: int, *, ready: bool = False) -> StandbyMachine | None:
    statuses = [StandbyMachine.Status.READY] if ready else list(StandbyMachine.ACTIVE)
    return StandbyMachine.objects.filter(instance_id=instance_id, status__in=statuses).order_by("-id").first()


def lag_seconds(standby: StandbyMachine | None, now: datetime | None = None) -> float | None:
    """How old the mirror is: seconds since the last good sync started (None: never synced)."""
    if standby is None or standby.last_sync_at is None:
        return None
    return round(((now or timezone.now()) - standby.last_sync_at).total_seconds(), 1)


def standby_status(*, owner) -> list[dict]:
    """Each of the owner's live GPU instances with its standby (`GET /api/v1/standby/status`)."""
    now = timezone.now()
    instances = Instance.objects.filter(owner=owner).exclude(status__in=[Status.DESTROYED, Status.FAILED])
    latest: dict[int, StandbyMachine] = {}
    for standby in StandbyMachine.objects.filter(instance__in=instances).order_by("instance_id", "-id"):
        latest.setdefault(standby.instance_id, standby)
    return [{"instance": i, "standby": latest.get(i.pk), "lag_seconds": lag_seconds(latest.get(i.pk), now)}
            for i in instances.order_by("id")]


def standby_spend(instances, *, since: datetime, until: datetime) -> Decimal:
    """Dollars the standbys of these instances cost in [since, until] (their $/h while rented)."""
    total = Decimal(0)
    for standby in StandbyMachine.objects.filter(instance__in=instances, price_per_hour__isnull=False).filter(
            Q(destroyed_at__isnull=True) | Q(destroyed_at__gt=since)).exclude(provider_instance_id=""):
        start = max(standby.created_at, since)
        end = min(standby.destroyed_at or until, until)
        if end > start:
            total += standby.price_per_hour * Decimal(str((end - start).total_seconds())) / Decimal(3600)
    return total


def instances_to_presync(snapshot_ids: list[int]) -> list[int]:
    """The instances whose periodic sync just got recorded (these snapshot rows, verified) and whose fast path
    is older than SNAPSHOT_FASTPATH_PRESYNC_SECONDS: a presync now keeps their hibernation short."""
    from snapshots import selectors as snapshot_selectors
    from snapshots.models import Snapshot

    if not (settings.SNAPSHOT_FASTPATH and settings.SNAPSHOT_FASTPATH_PRESYNC_SECONDS > 0 and snapshot_ids):
        return []
    synced = set(Snapshot.objects.filter(pk__in=snapshot_ids, status=Snapshot.Status.VERIFIED)
                 .values_list("instance_id", flat=True))
    return snapshot_selectors.fastpath_presync_due(synced, older_than_seconds=settings.SNAPSHOT_FASTPATH_PRESYNC_SECONDS)
