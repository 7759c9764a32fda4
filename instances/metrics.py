"""Metrics and real savings, computed from the event ledger (never from counters that could drift).

The ledger is each instance's `status` events: every transition records when it happened, and the ones
that start a period carry the machine's $/h and GPU model in their data (`running`: the winner's price;
`hibernated`: the price of the machine that was destroyed). Periods are derived per instance from
consecutive transitions, so they never overlap and nothing is counted twice.

Real savings of a hibernated period = hours hibernated x that machine's $/h, minus what the hibernation
itself cost: snapshot storage for those hours (the owner's repository size x SNAPSHOT_STORAGE_PRICE_PER_GB_MONTH)
and the machines that lost the wake races (their attempt costs). Conservative on purpose: a wake race's
losers are counted even when the user would have had to launch anyway.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections import defaultdict
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db.models import Count
from django.utils import timezone

from agent.buffer import dead_letter_count
from instances.models import Instance, InstanceEvent
from instances.selectors import standby_spend
from instances.states import Status
from machines.models import MachineAttempt

HOURS_PER_MONTH = Decimal(730)
CENT = Decimal("0.01")
MICRO = Decimal("0.000001")


@dataclasses.dataclass(frozen=True)
class Period:
    instance_id: int
    status: str
    start: datetime
    end: datetime
    price_per_hour: Decimal
    gpu_name: str

    @property
    def hours(self) -> Decimal:
        return Decimal(str((self.end - self.start).total_seconds())) / Decimal(3600)


def status_periods(instances: list[Instance], *, since: datetime, until: datetime) -> list[Period]:
    """Every status period of these instances, clipped to [since, until]."""
    events = (
        InstanceEvent.objects.filter(instance__in=instances, kind=InstanceEvent.Kind.STATUS, created_at__lt=until)
        .order_by("instance_id", "id")
        .values("instance_id", "created_at", "data")
    )
    gpu_names = {i.pk: i.gpu_name for i in instances}
    by_instance: dict[int, list[dict]] = defaultdict(list)
    for event in events:
        by_instance[event["instance_id"]].append(event)
    periods = []
    for instance_id, transitions in by_instance.items():
        for current, following in zip(transitions, [*transitions[1:], None], strict=True):
            start = max(current["created_at"], since)
            end = min(following["created_at"] if following else until, until)
            if end <= start:
                continue
            data = current["data"]
            periods.append(Period(
                instance_id=instance_id, status=data.get("to", ""), start=start, end=end,
                price_per_hour=Decimal(str(data.get("price_per_hour") or 0)),
                gpu_name=data.get("gpu_name") or gpu_names.get(instance_id) or "",
            ))
    return periods


def _storage_cost(repository_bytes: int, hours: Decimal) -> Decimal:
    gigabytes = Decimal(repository_bytes) / Decimal(10**9)
    return gigabytes * Decimal(str(settings.SNAPSHOT_STORAGE_PRICE_PER_GB_MONTH)) * hours / HOURS_PER_MONTH


def _repository_bytes(instances: list[Instance]) -> dict[int, int]:
    """Each instance's own share of its owner's snapshot storage: the new data its kept snapshots added
    to the (deduplicated) repository, capped by the repository's measured size. Never the whole
    repository per instance: an owner with ten instances would be charged ten times over."""
    from django.db.models import Sum

    from snapshots.models import Snapshot, SnapshotRepository

    sizes = dict(SnapshotRepository.objects.filter(owner__in={i.owner_id for i in instances})
                 .values_list("owner_id", "size_bytes"))
    added = dict(Snapshot.objects.filter(instance__in=instances, status=Snapshot.Status.VERIFIED)
                 .values("instance_id").annotate(total=Sum("added_bytes")).values_list("instance_id", "total"))
    return {i.pk: min(added.get(i.pk) or 0, sizes.get(i.owner_id) or 0) for i in instances}


def savings_report(*, user=None, days: int, now: datetime | None = None) -> dict:
    """One user's savings, or the whole fleet's (user=None, the admin's savings page)."""
    now = now or timezone.now()
    since = now - timedelta(days=days)
    instances = list(Instance.objects.filter(owner=user) if user is not None else Instance.objects.all())
    periods = status_periods(instances, since=since, until=now)
    hibernated = [p for p in periods if p.status == Status.HIBERNATED]
    repo_bytes = _repository_bytes(instances)
    # machines that lost a wake race (attempts made while the instance was waking)
    waking = [p for p in periods if p.status == Status.WAKING]
    wake_losers = [
        attempt
        for attempt in MachineAttempt.objects.filter(instance__in=instances, created_at__gte=since)
        .exclude(outcome=MachineAttempt.Outcome.WON)
        if any(p.instance_id == attempt.instance_id and p.start <= attempt.created_at < p.end for p in waking)
    ]
    gpu_names = {i.pk: i.gpu_name for i in instances}

    per_instance: dict[int, dict] = {}

    def row_of(instance_id: int, gpu_name: str) -> dict:
        return per_instance.setdefault(instance_id, {
            "instance": instance_id, "gpu_name": gpu_name, "hours_hibernated": Decimal(0),
            "gross_savings": Decimal(0), "storage_cost": Decimal(0), "race_cost": Decimal(0),
        })

    daily: dict[str, Decimal] = defaultdict(Decimal)
    for period in hibernated:
        row = row_of(period.instance_id, period.gpu_name)
        row["hours_hibernated"] += period.hours
        row["gross_savings"] += period.hours * period.price_per_hour
        row["storage_cost"] += _storage_cost(repo_bytes[period.instance_id], period.hours)
        day = period.start
        while day < period.end:  # split across days for the daily series
            next_midnight = datetime.combine(day.date() + timedelta(days=1), datetime.min.time(), tzinfo=day.tzinfo)
            day_end = min(period.end, next_midnight)
            hours = Decimal(str((day_end - day).total_seconds())) / Decimal(3600)
            daily[day.date().isoformat()] += (
                hours * period.price_per_hour - _storage_cost(repo_bytes[period.instance_id], hours)
            )
            day = day_end
    for attempt in wake_losers:
        row_of(attempt.instance_id, gpu_names.get(attempt.instance_id, ""))["race_cost"] += attempt.cost
        daily[attempt.created_at.date().isoformat()] -= attempt.cost

    per_gpu: dict[str, dict] = defaultdict(lambda: {"hours_hibernated": Decimal(0), "net_savings": Decimal(0)})
    rows = []
    for row in per_instance.values():
        row["net_savings"] = row["gross_savings"] - row["storage_cost"] - row["race_cost"]
        per_gpu[row["gpu_name"]]["net_savings"] += row["net_savings"]
        per_gpu[row["gpu_name"]]["hours_hibernated"] += row["hours_hibernated"]
        rows.append({key: _money(value) if isinstance(value, Decimal) and key != "hours_hibernated" else value
                     for key, value in row.items()} | {"hours_hibernated": _hours(row["hours_hibernated"])})
    totals = {
        "hours_hibernated": _hours(sum((r["hours_hibernated"] for r in per_instance.values()), Decimal(0))),
        "gross_savings": _money(sum((r["gross_savings"] for r in per_instance.values()), Decimal(0))),
        "storage_cost": _money(sum((r["storage_cost"] for r in per_instance.values()), Decimal(0))),
        "race_cost": _money(sum((r["race_cost"] for r in per_instance.values()), Decimal(0))),
    }
    net = sum((r["net_savings"] for r in per_instance.values()), Decimal(0))
    totals["net_savings"] = _money(net)
    return {
        "days": days,
        "since": since,
        "until": now,
        "totals": totals,
        "projected_month": _money(net * Decimal(30) / Decimal(days)),
        "per_instance": sorted(rows, key=lambda r: r["instance"]),
        "per_gpu": [{"gpu_name": gpu, "hours_hibernated": _hours(v["hours_hibernated"]),
                     "net_savings": _money(v["net_savings"])} for gpu, v in sorted(per_gpu.items())],
        "daily": [{"date": date, "net_savings": _money(value)} for date, value in sorted(daily.items())],
    }


def fleet_metrics(*, user, days: int = 30, now: datetime | None = None) -> dict:
    now = now or timezone.now()
    since = now - timedelta(days=days)
    instances = list(Instance.objects.filter(owner=user))
    by_state = dict(Instance.objects.filter(owner=user).values_list("status").annotate(n=Count("id")))
    periods = status_periods(instances, since=since, until=now)
    holding = [p for p in periods if p.status in (Status.RUNNING, Status.PAUSING, Status.PAUSED, Status.HIBERNATING,
                                                  Status.UNREACHABLE)]
    gpu_hours = sum((p.hours for p in periods if p.status == Status.RUNNING), Decimal(0))
    machine_spend = sum((p.hours * p.price_per_hour for p in holding if p.status != Status.PAUSED), Decimal(0))
    # a machine_lost row records a loss, not another rental
    attempts = MachineAttempt.objects.filter(instance__in=instances, created_at__gte=since).exclude(
        outcome__in=[MachineAttempt.Outcome.MACHINE_LOST, MachineAttempt.Outcome.UNREACHABLE])
    ready = sorted(a.seconds_to_ready for a in attempts if a.outcome == MachineAttempt.Outcome.WON
                   and a.seconds_to_ready is not None)
    loser_cost = sum((a.cost for a in attempts if a.outcome != MachineAttempt.Outcome.WON), Decimal(0))
    timings = _timings(instances, since)
    standby_cost = standby_spend(instances, since=since, until=now)
    return {
        "days": days,
        "instances_by_state": by_state,
        "gpu_hours": _hours(gpu_hours),
        "spend": {"machines": _money(machine_spend), "race_losers": _money(loser_cost),
                  "standby": _money(standby_cost), "total": _money(machine_spend + loser_cost + standby_cost)},
        "race": {
            "launches": len(ready),
            "median_seconds_to_ready": _round(statistics.median(ready)) if ready else None,
            "p90_seconds_to_ready": _round(ready[min(len(ready) - 1, round(0.9 * (len(ready) - 1)))]) if ready else None,
            "machines_rented": attempts.count(),
            "loser_cost": _money(loser_cost),
        },
        # this user's heartbeats PostgreSQL refused (agent.buffer's dead-letter list): 0 unless an agent misbehaves
        "heartbeats_set_aside": dead_letter_count([i.pk for i in instances]),
        **timings,
    }


def _timings(instances: list[Instance], since: datetime) -> dict:
    """Restore and wake timings, from the events the wake writes (`data.timings`)."""
    wakes = InstanceEvent.objects.filter(instance__in=instances, kind=InstanceEvent.Kind.WAKE,
                                         created_at__gte=since, data__has_key="timings")
    parts: dict[str, list[float]] = defaultdict(list)
    for event in wakes:
        for name, seconds in event.data["timings"].items():
            parts[name].append(float(seconds))

    def summary(values: list[float]) -> dict | None:
        if not values:
            return None
        return {"count": len(values), "median_seconds": _round(statistics.median(values)),
                "max_seconds": _round(max(values))}

    return {"wake": {name: summary(values) for name, values in sorted(parts.items())},
            "restore": summary(parts.get("restore", []))}


def _money(value: Decimal) -> Decimal:
    return value.quantize(MICRO)


def _hours(value: Decimal) -> Decimal:
    return value.quantize(Decimal("0.0001"))


def _round(value: float) -> float:
    return round(value, 3)
