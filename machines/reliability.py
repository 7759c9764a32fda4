"""Per-host reliability: stats from attempts, automatic blacklisting, and offer ranking.

Judging an attempt: a machine that became ready (running + answered SSH) is a success; one that failed
to boot, exited, never answered SSH or whose create failed is a failure; a machine destroyed because
another won before it was ready (`lost`, `abandoned`) is not judged: we cannot know how it would have
ended.

Whose view: a failure counts against a host fleet-wide only when the provider confirmed it on the host's
side (a race's failure, or a running machine the provider reports `failed`). A failure its tenant could
have caused (a running machine whose SSH and agent went silent: killing sshd is enough) has
`host_fault_confirmed` False and counts only for that owner: their own blacklist entry for the host, which
no other user's race or offer list sees.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from machines.models import MachineAttempt, MachineBlacklist, MachineStats
from machines.providers.base import Offer

Outcome = MachineAttempt.Outcome
FAILURES = frozenset({Outcome.BOOT_TIMEOUT, Outcome.SSH_FAILED, Outcome.PROVIDER_ERROR, Outcome.FAILED_STATUS,
                      Outcome.MACHINE_LOST, Outcome.UNREACHABLE})
# failures that say the host itself is broken (not just slow or busy): blacklisted for longer
SEVERE_FAILURES = frozenset({Outcome.SSH_FAILED, Outcome.FAILED_STATUS, Outcome.MACHINE_LOST, Outcome.UNREACHABLE})


def attempt_verdict(attempt: MachineAttempt) -> bool | None:
    """True: success, False: failure, None: not judged."""
    if attempt.outcome == Outcome.WON or attempt.ready_at is not None:
        return True
    if attempt.outcome in FAILURES:
        return False
    return None


def band(success_rate: float | None, judged: int) -> str:
    if success_rate is None or judged < settings.RELIABILITY_MIN_ATTEMPTS:
        return "unknown"
    if success_rate >= 0.9:
        return "excellent"
    if success_rate >= 0.7:
        return "good"
    if success_rate >= 0.4:
        return "fair"
    return "poor"


def host_stats_update(*, provider: str, host_id: str) -> MachineStats:
    """Recompute one host's stats from its attempts in the window, and blacklist it if it earned it."""
    now = timezone.now()
    window_start = now - timedelta(hours=settings.RELIABILITY_WINDOW_HOURS)
    attempts = list(
        MachineAttempt.objects.filter(provider=provider, host_id=host_id, created_at__gte=window_start,
                                      host_fault_confirmed=True).order_by("id")
    )
    verdicts = [(a, attempt_verdict(a)) for a in attempts]
    judged = [(a, v) for a, v in verdicts if v is not None]
    successes = [a for a, v in judged if v]
    consecutive_failures = 0
    for _attempt, verdict in reversed(judged):
        if verdict:
            break
        consecutive_failures += 1
    ready_times = [a.seconds_to_ready for a in successes if a.seconds_to_ready is not None]
    with transaction.atomic():
        stats, _ = MachineStats.objects.select_for_update().get_or_create(provider=provider, host_id=host_id)
        stats.attempts = len(attempts)
        stats.successes = len(successes)
        stats.failures = len(judged) - len(successes)
        stats.consecutive_failures = consecutive_failures
        stats.success_rate = len(successes) / len(judged) if judged else None
        stats.median_seconds_to_ready = statistics.median(ready_times) if ready_times else None
        stats.last_attempt_at = attempts[-1].created_at if attempts else stats.last_attempt_at
        stats.last_success_at = max((a.ready_at or a.created_at for a in successes), default=stats.last_success_at)
        stats.save()
        _blacklist_if_earned(stats, judged)
    return stats


def _blacklist_if_earned(stats: MachineStats, judged: list[tuple[MachineAttempt, bool]]) -> MachineBlacklist | None:
    min_attempts = settings.RELIABILITY_MIN_ATTEMPTS
    poor = len(judged) >= min_attempts and (stats.success_rate or 0) < settings.RELIABILITY_BLACKLIST_BELOW
    streak = stats.consecutive_failures >= settings.RELIABILITY_MAX_CONSECUTIVE_FAILURES
    if not (poor or streak):
        return None
    if MachineBlacklist.objects.active().filter(provider=stats.provider, host_id=stats.host_id,
                                                owner__isnull=True).exists():
        return None
    last_failure = next((a for a, verdict in reversed(judged) if not verdict), None)
    severe = last_failure is not None and last_failure.outcome in SEVERE_FAILURES
    hours = settings.BLACKLIST_SEVERE_HOURS if severe else settings.BLACKLIST_HOURS
    why = (
        f"{stats.consecutive_failures} consecutive failures"
        if streak
        else f"success rate {stats.success_rate:.0%} over {len(judged)} attempts"
    )
    if last_failure is not None:
        why += f" (last: {last_failure.outcome} at {last_failure.failure_stage or 'create'})"
    return MachineBlacklist.objects.create(
        provider=stats.provider, host_id=stats.host_id, reason=why, source=MachineBlacklist.Source.AUTOMATIC,
        until=timezone.now() + timedelta(hours=hours),
    )


def owner_failures_update(*, provider: str, host_id: str, owner_id: int) -> MachineBlacklist | None:
    """After a failure the provider did not confirm: blacklist the host for this owner only, once their
    own unconfirmed failures on it reach RELIABILITY_MAX_CONSECUTIVE_FAILURES in the window."""
    window_start = timezone.now() - timedelta(hours=settings.RELIABILITY_WINDOW_HOURS)
    failures = MachineAttempt.objects.filter(provider=provider, host_id=host_id, instance__owner_id=owner_id,
                                             host_fault_confirmed=False, created_at__gte=window_start).count()
    if failures < settings.RELIABILITY_MAX_CONSECUTIVE_FAILURES:
        return None
    active = MachineBlacklist.objects.active().filter(provider=provider, host_id=host_id, owner_id=owner_id).first()
    if active is not None:
        return active
    return MachineBlacklist.objects.create(
        provider=provider, host_id=host_id, owner_id=owner_id, source=MachineBlacklist.Source.AUTOMATIC,
        reason=f"{failures} machines of yours on this host went unreachable (not confirmed by the provider)",
        until=timezone.now() + timedelta(hours=settings.BLACKLIST_HOURS),
    )


def blacklisted_hosts(provider: str, *, owner=None) -> set[str]:
    """Hosts no race of `owner` may use: the fleet-wide blacklist, plus that owner's own entries."""
    entries = MachineBlacklist.objects.active().filter(provider=provider)
    mine = Q(owner__isnull=True) | Q(owner=owner) if owner is not None else Q(owner__isnull=True)
    return set(entries.filter(mine).values_list("host_id", flat=True))


def blacklist_add(*, provider: str, host_id: str, reason: str, hours: float | None, by=None) -> MachineBlacklist:
    existing = MachineBlacklist.objects.active().filter(provider=provider, host_id=host_id, owner__isnull=True).first()
    if existing:
        return existing
    until = timezone.now() + timedelta(hours=hours) if hours else None
    return MachineBlacklist.objects.create(
        provider=provider, host_id=host_id, reason=reason, source=MachineBlacklist.Source.MANUAL, until=until,
        created_by=by,
    )


def blacklist_lift(*, provider: str, host_id: str, by=None) -> int:
    return MachineBlacklist.objects.active().filter(provider=provider, host_id=host_id).update(
        lifted_at=timezone.now(), lifted_by=by
    )


@dataclass(frozen=True)
class RatedOffer:
    offer: Offer
    success_rate: float | None
    judged_attempts: int
    band: str
    blacklisted: bool
    expected_price: Decimal  # price / estimated success probability: what ranking sorts on


def rate_offers(provider: str, offers: list[Offer], *, owner=None) -> list[RatedOffer]:
    """Each offer with our own record of its host, ranked cheapest per expected success first.

    The success probability is our success rate smoothed towards the provider's own reliability score
    (two pseudo-attempts), so a host with no history is judged by the provider's word.
    """
    hosts = {offer.host_id for offer in offers}
    stats = {s.host_id: s for s in MachineStats.objects.filter(provider=provider, host_id__in=hosts)}
    banned = blacklisted_hosts(provider, owner=owner)
    rated = []
    for offer in offers:
        host = stats.get(offer.host_id)
        judged = (host.successes + host.failures) if host else 0
        prior = offer.reliability if offer.reliability is not None else 0.8
        p_success = ((host.successes if host else 0) + 2 * prior) / (judged + 2)
        rated.append(
            RatedOffer(
                offer=offer,
                success_rate=host.success_rate if host else None,
                judged_attempts=judged,
                band=band(host.success_rate if host else None, judged),
                blacklisted=offer.host_id in banned,
                expected_price=offer.price_per_hour / Decimal(str(max(p_success, 0.05))),
            )
        )
    rated.sort(key=lambda r: (r.blacklisted, r.expected_price, r.offer.offer_id))
    return rated
