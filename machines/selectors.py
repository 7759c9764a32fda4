"""Reads of the machines app."""

from __future__ import annotations

from django.conf import settings
from django.db.models import Avg, Count, Q, Sum

from machines import reliability
from machines.clients import clients_for_user
from machines.models import MachineAttempt, MachineBlacklist, MachineStats, ProviderAccount, SSHKey
from machines.providers.base import OfferQuery, ProviderError


def provider_accounts_of(user):
    return ProviderAccount.objects.filter(owner=user)


def ssh_keys_of(user):
    return SSHKey.objects.filter(owner=user)


def attempts_of(user):
    """A user sees the attempts made for their own instances only."""
    return MachineAttempt.objects.filter(instance__owner=user).order_by("-id")


def machine_history(*, user, attempts_limit: int = 100) -> dict:
    """Summary and recent attempts are the user's own; host stats and the blacklist are fleet-wide
    knowledge about provider hosts (like a provider's own reliability score), not user data."""
    attempts = attempts_of(user)
    totals = attempts.aggregate(
        attempts=Count("id"),
        won=Count("id", filter=Q(outcome=MachineAttempt.Outcome.WON)),
        failed=Count(
            "id",
            filter=Q(
                outcome__in=[
                    MachineAttempt.Outcome.BOOT_TIMEOUT,
                    MachineAttempt.Outcome.SSH_FAILED,
                    MachineAttempt.Outcome.PROVIDER_ERROR,
                    MachineAttempt.Outcome.FAILED_STATUS,
                ]
            ),
        ),
        cost=Sum("cost"),
        avg_seconds_to_ready=Avg("seconds_to_ready", filter=Q(outcome=MachineAttempt.Outcome.WON)),
    )
    return {
        "summary": {**totals, "cost": totals["cost"] or 0},
        "attempts": list(attempts.select_related("instance")[:attempts_limit]),
        "stats": list(MachineStats.objects.order_by("-attempts")[:500]),
        "problematic": list(
            MachineStats.objects.filter(attempts__gte=1)
            .filter(Q(consecutive_failures__gte=2) | Q(success_rate__lt=0.7))
            .order_by("success_rate", "-consecutive_failures")[:100]
        ),
        "reliable": list(
            MachineStats.objects.filter(
                success_rate__gte=0.9, successes__gte=settings.RELIABILITY_MIN_ATTEMPTS
            ).order_by("-success_rate", "median_seconds_to_ready")[:100]
        ),
        # fleet-wide entries, and this user's own (never another user's)
        "blacklist": list(MachineBlacklist.objects.active().filter(Q(owner__isnull=True) | Q(owner=user))),
    }


def offers_for(*, user, query: OfferQuery) -> tuple[list[dict], list[dict]]:
    """Offers from every provider the user can rent from, each with our record of its host, ranked as
    the launch race ranks them (cheapest per expected success; blacklisted hosts last).

    One provider failing (down, bad key, rate-limited) does not hide the others: its error is returned
    beside the offers.
    """
    offers: list[dict] = []
    errors: list[dict] = []
    for provider, account, client in clients_for_user(user):
        try:
            found = client.search_offers(query)
        except ProviderError as exc:
            errors.append({"provider": provider, "account": account.pk if account else None, "detail": str(exc)})
            continue
        offers += [{"rated": rated, "account": account.pk if account else None}
                   for rated in reliability.rate_offers(provider, found, owner=user)]
    offers.sort(key=lambda item: (item["rated"].blacklisted, item["rated"].expected_price, item["rated"].offer.offer_id))
    return offers, errors
