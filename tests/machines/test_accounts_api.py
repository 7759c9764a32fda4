import json

import pytest
from django.db import connection

from machines.models import ProviderAccount
from tests.core.test_tenant_isolation import new_public_key

pytestmark = pytest.mark.django_db
API_KEY = "vast-secret-4f9c2e1d8a7b6c5d4e3f2a1b0c9d8e7f"


def test_provider_key_is_encrypted_at_rest_and_never_returned(api):
    created = api.post("/api/v1/provider-accounts", {"provider": "vastai", "name": "main", "api_key": API_KEY},
                       format="json")
    assert created.status_code == 201, created.json()
    assert created.json()["key_hint"] == API_KEY[-4:]
    with connection.cursor() as cursor:
        cursor.execute("SELECT api_key FROM machines_provideraccount WHERE id = %s", [created.json()["id"]])
        (raw,) = cursor.fetchone()
    assert API_KEY not in raw and API_KEY[:12] not in raw
    assert ProviderAccount.objects.get().api_key == API_KEY  # decrypts back
    for response in (created, api.get("/api/v1/provider-accounts"), api.get(f"/api/v1/provider-accounts/{created.json()['id']}")):
        assert API_KEY not in json.dumps(response.json())


def test_provider_account_validation(api):
    unknown = api.post("/api/v1/provider-accounts", {"provider": "aws", "name": "x", "api_key": API_KEY}, format="json")
    assert unknown.status_code == 400 and unknown.json()["error"] == "invalid_provider"
    missing = api.post("/api/v1/provider-accounts", {"provider": "vastai", "name": "x"}, format="json")
    assert missing.status_code == 400 and "api_key" in missing.json()["fields"]
    ok = {"provider": "vastai", "name": "x", "api_key": API_KEY}
    assert api.post("/api/v1/provider-accounts", ok, format="json").status_code == 201
    duplicate = api.post("/api/v1/provider-accounts", ok, format="json")
    assert duplicate.status_code == 409
    assert ProviderAccount.objects.count() == 1


def test_provider_account_delete(api):
    account_id = api.post("/api/v1/provider-accounts", {"provider": "runpod", "name": "r", "api_key": API_KEY},
                          format="json").json()["id"]
    assert api.delete(f"/api/v1/provider-accounts/{account_id}").status_code == 204
    assert api.delete(f"/api/v1/provider-accounts/{account_id}").status_code == 404


def test_ssh_keys_are_validated_fingerprinted_and_deduplicated(api):
    key = new_public_key()
    created = api.post("/api/v1/ssh-keys", {"name": "laptop", "public_key": f"{key} me@laptop"}, format="json")
    assert created.status_code == 201, created.json()
    assert created.json()["fingerprint"].startswith("SHA256:")
    again = api.post("/api/v1/ssh-keys", {"name": "other", "public_key": key}, format="json")
    assert again.status_code == 409
    for garbage in ("ssh-ed25519 AAAA", "hello", key.replace("ssh-ed25519", "ssh-rsa")):
        bad = api.post("/api/v1/ssh-keys", {"name": "bad", "public_key": garbage}, format="json")
        assert bad.status_code == 400, garbage
        assert bad.json()["error"] == "invalid_public_key"
    key_id = created.json()["id"]
    assert api.delete(f"/api/v1/ssh-keys/{key_id}").status_code == 204
    assert api.get("/api/v1/ssh-keys").json()["count"] == 0
