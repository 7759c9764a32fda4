"""Reads of the machines app."""

from __future__ import annotations

from django.db.models import Avg, Count, Q, Sum

from machines.models import MachineAttempt, MachineBlacklist, MachineStats, ProviderAccount, SSHKey


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
        "blacklist": list(MachineBlacklist.objects.active()),
    }
