from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from machines import reliability
from machines.models import MachineAttempt, MachineBlacklist, MachineStats
from machines.providers.base import Offer

pytestmark = pytest.mark.django_db
Outcome = MachineAttempt.Outcome


def attempts(host: str, *outcomes: str, ready: bool = False):
    for outcome in outcomes:
        MachineAttempt.objects.create(
            provider="local", host_id=host, offer_id="1", outcome=outcome,
            ready_at=timezone.now() if (ready or outcome == Outcome.WON) else None, seconds_to_ready=12.0,
        )


def test_a_host_that_crosses_the_30_percent_line_is_blacklisted_for_24h():
    attempts("h1", Outcome.WON, Outcome.BOOT_TIMEOUT, Outcome.BOOT_TIMEOUT)
    stats = reliability.host_stats_update(provider="local", host_id="h1")
    assert stats.success_rate == pytest.approx(1 / 3) and not MachineBlacklist.objects.exists()
    attempts("h1", Outcome.WON, Outcome.BOOT_TIMEOUT, Outcome.BOOT_TIMEOUT, Outcome.BOOT_TIMEOUT)
    stats = reliability.host_stats_update(provider="local", host_id="h1")
    assert stats.success_rate == pytest.approx(2 / 7) and stats.consecutive_failures == 3
    entry = MachineBlacklist.objects.active().get(provider="local", host_id="h1")
    assert entry.source == "automatic" and "boot_timeout" in entry.reason
    assert timedelta(hours=23) < entry.until - timezone.now() <= timedelta(hours=24)


def test_three_consecutive_severe_failures_blacklist_for_longer():
    attempts("h2", Outcome.WON, Outcome.WON, Outcome.WON, Outcome.SSH_FAILED, Outcome.SSH_FAILED, Outcome.SSH_FAILED)
    reliability.host_stats_update(provider="local", host_id="h2")
    entry = MachineBlacklist.objects.active().get(host_id="h2")
    assert entry.until - timezone.now() > timedelta(hours=70)


def test_losers_are_not_judged_and_a_good_host_stays_clear():
    attempts("h3", Outcome.LOST, Outcome.LOST, Outcome.LOST, Outcome.ABANDONED, Outcome.WON)
    stats = reliability.host_stats_update(provider="local", host_id="h3")
    assert (stats.attempts, stats.successes, stats.failures, stats.success_rate) == (5, 1, 0, 1.0)
    assert not MachineBlacklist.objects.exists()


def test_attempts_outside_the_window_do_not_count():
    attempts("h4", Outcome.BOOT_TIMEOUT, Outcome.BOOT_TIMEOUT, Outcome.BOOT_TIMEOUT)
    MachineAttempt.objects.update(created_at=timezone.now() - timedelta(hours=73))
    stats = reliability.host_stats_update(provider="local", host_id="h4")
    assert stats.attempts == 0 and not MachineBlacklist.objects.exists()


def offer(host: str, price: str, provider_reliability: float = 0.95) -> Offer:
    return Offer(provider="local", offer_id=f"o-{host}", host_id=host, gpu_name="RTX 4090", num_gpus=1, gpu_ram_gb=24,
                 price_per_hour=Decimal(price), reliability=provider_reliability, region="US", disk_gb=100)


def test_ranking_prefers_cheap_per_expected_success_and_puts_blacklisted_last():
    MachineStats.objects.create(provider="local", host_id="flaky", attempts=10, successes=1, failures=9, success_rate=0.1)
    MachineStats.objects.create(provider="local", host_id="solid", attempts=10, successes=10, failures=0, success_rate=1.0)
    reliability.blacklist_add(provider="local", host_id="banned", reason="manual test", hours=1)
    rated = reliability.rate_offers("local", [offer("flaky", "0.20"), offer("solid", "0.30"), offer("banned", "0.01"),
                                              offer("new", "0.28")])
    assert [r.offer.host_id for r in rated] == ["new", "solid", "flaky", "banned"]
    by_host = {r.offer.host_id: r for r in rated}
    assert by_host["solid"].band == "excellent" and by_host["flaky"].band == "poor"
    assert by_host["new"].band == "unknown" and by_host["banned"].blacklisted


def test_lifting_ends_the_blacklist():
    reliability.blacklist_add(provider="local", host_id="h5", reason="drill", hours=None)
    assert reliability.blacklisted_hosts("local") == {"h5"}
    assert reliability.blacklist_lift(provider="local", host_id="h5") == 1
    assert reliability.blacklisted_hosts("local") == set()


def test_blacklist_api_is_for_operators_only(api, user):
    body = {"provider": "local", "host_id": "h9", "reason": "smoke on rack 4", "hours": 2}
    assert api.post("/api/v1/machines/blacklist", body, format="json").status_code == 403
    user.is_staff = True
    user.save()
    created = api.post("/api/v1/machines/blacklist", body, format="json")
    assert created.status_code == 201 and created.json()["source"] == "manual"
    history = api.get("/api/v1/machines/history").json()
    assert [(b["host_id"], b["reason"]) for b in history["blacklist"]] == [("h9", "smoke on rack 4")]
    assert api.delete("/api/v1/machines/blacklist", {"provider": "local", "host_id": "h9"}, format="json").status_code == 204
    assert api.delete("/api/v1/machines/blacklist", {"provider": "local", "host_id": "h9"}, format="json").status_code == 404
    assert reliability.blacklisted_hosts("local") == set()


def test_history_lists_problematic_and_reliable_hosts(api):
    MachineStats.objects.create(provider="local", host_id="bad", attempts=5, successes=1, failures=4, success_rate=0.2,
                                consecutive_failures=3)
    MachineStats.objects.create(provider="local", host_id="good", attempts=9, successes=9, success_rate=1.0)
    history = api.get("/api/v1/machines/history").json()
    assert [s["host_id"] for s in history["problematic"]] == ["bad"]
    assert [s["host_id"] for s in history["reliable"]] == ["good"]
