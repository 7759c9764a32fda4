"""Savings and metrics on a hand-built ledger, checked against the hand computation."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from instances import metrics
from instances.models import InstanceEvent
from machines.models import MachineAttempt
from snapshots.models import Snapshot, SnapshotRepository
from tests.factories import make_instance

pytestmark = pytest.mark.django_db
T0 = datetime(2026, 11, 20, 20, 0, tzinfo=UTC)  # 20:00 UTC: the hibernation spans midnight


def status_event(instance, at, frm, to, **data):
    event = InstanceEvent.objects.create(instance=instance, kind="status", message=f"{frm} -> {to}",
                                         data={"from": frm, "to": to, **data})
    InstanceEvent.objects.filter(pk=event.pk).update(created_at=at)


def attempt(instance, at, outcome, cost, seconds=None):
    row = MachineAttempt.objects.create(instance=instance, provider="local", host_id="h", offer_id="o",
                                        outcome=outcome, cost=Decimal(cost), seconds_to_ready=seconds)
    MachineAttempt.objects.filter(pk=row.pk).update(created_at=at)


@pytest.fixture
def ledger(user):
    SnapshotRepository.objects.create(owner=user, prefix=f"users/{user.pk}", password="x", size_bytes=2 * 10**9)
    box = make_instance(user, status="running", gpu_name="RTX 4090")
    # the whole repository is this instance's: its snapshots added all of it
    Snapshot.objects.create(owner=user, instance=box, reason="hibernate", status="verified", added_bytes=2 * 10**9)
    status_event(box, T0 - timedelta(hours=2), "launching", "running", price_per_hour="0.40", gpu_name="RTX 4090")
    attempt(box, T0 - timedelta(hours=2, minutes=1), "won", "0.002", seconds=42.0)
    attempt(box, T0 - timedelta(hours=2, minutes=1), "lost", "0.003")  # a launch loser: not a wake cost
    status_event(box, T0 - timedelta(minutes=1), "running", "hibernating")
    status_event(box, T0, "hibernating", "hibernated", price_per_hour="0.40", gpu_name="RTX 4090")
    status_event(box, T0 + timedelta(hours=10), "hibernated", "waking")
    attempt(box, T0 + timedelta(hours=10, minutes=1), "lost", "0.012")
    attempt(box, T0 + timedelta(hours=10, minutes=1), "won", "0.001", seconds=30.0)
    status_event(box, T0 + timedelta(hours=10, minutes=2), "waking", "running", price_per_hour="0.40",
                 gpu_name="RTX 4090")
    InstanceEvent.objects.create(instance=box, kind="wake", message="awake",
                                 data={"timings": {"race": 30.0, "restore": 12.5, "agent": 1.5, "total": 44.0}})
    return box


def test_savings_match_the_hand_computation_to_the_cent(user, ledger):
    report = metrics.savings_report(user=user, days=30, now=T0 + timedelta(hours=12))
    # 10 h hibernated x $0.40 = $4.00; storage: 2 GB x $0.015/GB-month x 10 h / 730 h = $0.000411;
    # the wake race's loser: $0.012.  Net: 4.00 - 0.000411 - 0.012 = $3.987589
    totals = report["totals"]
    assert totals["hours_hibernated"] == Decimal("10.0000")
    assert totals["gross_savings"] == Decimal("4.000000")
    assert totals["storage_cost"] == Decimal("0.000411")
    assert totals["race_cost"] == Decimal("0.012000")
    assert totals["net_savings"] == Decimal("3.987589")
    assert totals["net_savings"].quantize(Decimal("0.01")) == Decimal("3.99")
    assert report["per_gpu"] == [{"gpu_name": "RTX 4090", "hours_hibernated": Decimal("10.0000"),
                                  "net_savings": Decimal("3.987589")}]
    # 4 h before midnight, 6 h after; the race loser on the second day
    daily = {d["date"]: d["net_savings"] for d in report["daily"]}
    assert daily == {"2026-11-20": Decimal("1.599836"), "2026-11-21": Decimal("2.387753")}
    assert sum(daily.values()) == totals["net_savings"]
    assert report["projected_month"] == Decimal("3.987589")  # 30-day window: the month is the window


def test_each_instance_pays_its_own_share_of_the_repository_not_all_of_it(user):
    SnapshotRepository.objects.create(owner=user, prefix=f"users/{user.pk}", password="x", size_bytes=2 * 10**9)
    big, small = make_instance(user, status="hibernated"), make_instance(user, status="hibernated")
    Snapshot.objects.create(owner=user, instance=big, reason="hibernate", status="verified", added_bytes=15 * 10**8)
    Snapshot.objects.create(owner=user, instance=small, reason="hibernate", status="verified", added_bytes=5 * 10**8)
    Snapshot.objects.create(owner=user, instance=small, reason="manual", status="deleted", added_bytes=9 * 10**9)
    for box in (big, small):
        status_event(box, T0, "hibernating", "hibernated", price_per_hour="0.40", gpu_name="RTX 4090")
    report = metrics.savings_report(user=user, days=30, now=T0 + timedelta(hours=10))
    storage = {row["instance"]: row["storage_cost"] for row in report["per_instance"]}
    # 1.5 GB and 0.5 GB x $0.015/GB-month x 10 h / 730 h; together the repository's 2 GB, charged once
    assert storage == {big.pk: Decimal("0.000308"), small.pk: Decimal("0.000103")}
    assert report["totals"]["storage_cost"] == Decimal("0.000411")


def test_a_window_that_cuts_the_hibernation_counts_only_its_part(user, ledger):
    report = metrics.savings_report(user=user, days=1, now=T0 + timedelta(hours=30))  # window from T0+6h
    assert report["totals"]["hours_hibernated"] == Decimal("4.0000")
    assert report["totals"]["gross_savings"] == Decimal("1.600000")


def test_fleet_metrics_from_the_same_ledger(user, ledger):
    figures = metrics.fleet_metrics(user=user, days=30, now=T0 + timedelta(hours=12))
    # running 2h (until hibernating at T0-1min: 1h59m) + 1h58m after the wake
    assert figures["gpu_hours"] == Decimal("3.9500")
    assert figures["race"]["launches"] == 2 and figures["race"]["median_seconds_to_ready"] == 36.0
    assert figures["race"]["loser_cost"] == Decimal("0.015000")
    assert figures["restore"] == {"count": 1, "median_seconds": 12.5, "max_seconds": 12.5}
    assert figures["instances_by_state"] == {"running": 1}


def test_savings_api_is_per_user(api, other_api, ledger):
    assert api.get("/api/v1/metrics/savings/real?days=30").status_code == 200
    other = other_api.get("/api/v1/metrics/savings/real?days=30").json()
    assert other["per_instance"] == [] and Decimal(other["totals"]["net_savings"]) == 0
    assert api.get("/api/v1/metrics/savings/real?days=0").status_code == 400
    assert api.get("/api/v1/metrics").status_code == 200
