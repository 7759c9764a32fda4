"""Writes of the machines app: provider accounts, SSH keys, blacklist."""

from __future__ import annotations

import base64
import hashlib
import json

from django.db import transaction

from dumont.core.errors import Conflict, InvalidInput, NotFound
from machines.clients import ACCOUNTLESS_PROVIDERS
from machines.models import ProviderAccount, SSHKey
from machines.providers.base import provider_names


def provider_account_create(*, owner, provider: str, name: str, api_key: str) -> ProviderAccount:
    known = [name for name in provider_names() if name not in ACCOUNTLESS_PROVIDERS]
    if provider not in known:
        raise InvalidInput(f"Unknown provider {provider!r}; accounts exist for: {', '.join(known)}.", code="invalid_provider")
    api_key = api_key.strip()
    if len(api_key) < 8:
        raise InvalidInput("The API key looks too short.", code="invalid_api_key")
    if ProviderAccount.objects.filter(owner=owner, name=name).exists():
        raise Conflict(f"You already have a provider account named {name!r}.")
    return ProviderAccount.objects.create(
        owner=owner, provider=provider, name=name, api_key=api_key, key_hint=_key_hint(provider, api_key)
    )


def _key_hint(provider: str, api_key: str) -> str:
    """The last characters of the key, to tell keys apart; for a GCP service-account key (JSON), of its
    key id, as the Cloud Console shows it (the JSON's own last characters could be private-key text)."""
    if provider == "gcp":
        return str(json.loads(api_key).get("private_key_id") or "")[-4:]
    return api_key[-4:]


def provider_account_delete(*, owner, account_id: int) -> None:
    with transaction.atomic():
        account = ProviderAccount.objects.select_for_update().filter(owner=owner, pk=account_id).first()
        if account is None:
            raise NotFound("No such provider account.")
        if account.instances.exclude(status__in=("destroyed", "failed")).exists():
            raise Conflict("Instances still use this provider account; destroy them first.")
        # a standby machine rented through this account that is not destroyed yet: without the account,
        # reconcile could no longer list it, and it would run (and bill) unseen
        if account.standbys.filter(destroyed_at__isnull=True).exclude(status="failed", provider_instance_id="").exists():
            raise Conflict("A CPU standby still runs on this provider account; disable standbys (or wait for "
                           "its destroy) first.", data={"reason": "standby"})
        # what is left are finished rows (their machines are gone): they keep their history, not the account
        account.instances.update(provider_account=None)
        account.standbys.update(provider_account=None)
        account.delete()


def ssh_key_fingerprint(public_key: str) -> str:
    """SHA256 fingerprint as `ssh-keygen -l` prints it."""
    blob = base64.b64decode(public_key.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def ssh_key_add(*, owner, name: str, public_key: str) -> SSHKey:
    from machines.ssh import parse_public_key

    try:
        key_type, key_b64, _comment = parse_public_key(public_key)
    except ValueError as exc:
        raise InvalidInput(f"public_key: {exc}", code="invalid_public_key", data={"fields": {"public_key": [str(exc)]}}) from exc
    normalized = f"{key_type} {key_b64} {name}"
    fingerprint = ssh_key_fingerprint(normalized)
    if SSHKey.objects.filter(owner=owner, fingerprint=fingerprint).exists():
        raise Conflict("This public key is already registered.")
    if SSHKey.objects.filter(owner=owner, name=name).exists():
        raise Conflict(f"You already have a key named {name!r}.")
    return SSHKey.objects.create(owner=owner, name=name, public_key=f"{key_type} {key_b64}", fingerprint=fingerprint)


def ssh_key_delete(*, owner, key_id: int) -> None:
    deleted, _ = SSHKey.objects.filter(owner=owner, pk=key_id).delete()
    if not deleted:
        raise NotFound("No such SSH key.")
