"""Provider adapters built for a user's account (or the accountless local marketplace).

This is the one place that turns a `ProviderAccount` into an adapter: the decrypted key goes straight
into the adapter and nowhere else (no task argument, no log line).
"""

from __future__ import annotations

from django.conf import settings

from dumont.core.errors import InvalidInput
from machines.models import ProviderAccount
from machines.providers.base import Provider, get_provider

ACCOUNTLESS_PROVIDERS = frozenset({"local"})


def _base_url(provider: str) -> str | None:
    return {
        "local": settings.LOCAL_MARKETPLACE_URL,
        "vastai": settings.VASTAI_API_URL,
        "runpod": settings.RUNPOD_API_URL,
        "gcp": settings.GCP_COMPUTE_API_URL,
    }.get(provider)


def provider_client(provider: str, account: ProviderAccount | None = None) -> Provider:
    if provider in ACCOUNTLESS_PROVIDERS:
        if provider == "local" and not settings.LOCAL_MARKETPLACE_ENABLED:
            raise InvalidInput("The local marketplace is disabled on this server.", code="provider_disabled")
        return get_provider(provider, base_url=_base_url(provider), timeout=settings.PROVIDER_TIMEOUT_SECONDS)
    if account is None or account.provider != provider:
        raise InvalidInput(f"Provider {provider!r} needs one of your provider accounts.", code="account_required")
    options = {"api_key": account.api_key, "timeout": settings.PROVIDER_TIMEOUT_SECONDS}
    if base_url := _base_url(provider):
        options["base_url"] = base_url
    return get_provider(provider, **options)


def clients_for_user(user=None) -> list[tuple[str, ProviderAccount | None, Provider]]:
    """Every provider this user can rent from: the local marketplace (when enabled) and each account.
    `user` None: every account of every user (the reconcile sweep)."""
    clients: list[tuple[str, ProviderAccount | None, Provider]] = []
    if settings.LOCAL_MARKETPLACE_ENABLED:
        clients.append(("local", None, provider_client("local")))
    accounts = ProviderAccount.objects.all() if user is None else ProviderAccount.objects.filter(owner=user)
    for account in accounts.order_by("id"):
        clients.append((account.provider, account, provider_client(account.provider, account)))
    return clients
