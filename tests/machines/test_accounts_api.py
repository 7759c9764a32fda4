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


def _gcp_key(**overrides) -> dict:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    key = {"type": "service_account", "project_id": "dumont-standby-demo", "private_key_id": "3f1c9a7be2d4058e6a1f",
           "private_key": pem, "client_email": "standby@dumont-standby-demo.iam.gserviceaccount.com",
           "client_id": "104731829501736482911", "token_uri": "https://oauth2.googleapis.com/token",
           "universe_domain": "googleapis.com"}
    key.update(overrides)
    return {k: v for k, v in key.items() if v is not None}


def test_gcp_account_takes_a_service_account_key_and_the_hint_shows_no_key_material(api):
    key = _gcp_key()
    created = api.post("/api/v1/provider-accounts",
                       {"provider": "gcp", "name": "standby", "api_key": json.dumps(key, indent=2)}, format="json")
    assert created.status_code == 201, created.json()
    hint = created.json()["key_hint"]
    assert hint == key["private_key_id"][-4:]  # the tail of the key's id, never of the key
    assert json.loads(ProviderAccount.objects.get().api_key) == key  # the same key
    assert key["private_key"][40:80] not in json.dumps(created.json())


def test_gcp_account_refuses_what_is_not_a_service_account_key(api):
    good = _gcp_key()
    for bad, words in [
        ("not json at all", "Not JSON"),
        (json.dumps({**good, "type": "authorized_user"}), "service_account"),
        (json.dumps(_gcp_key(client_email=None, token_uri=None)), "client_email, token_uri"),
        (json.dumps({**good, "private_key": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"}),
         "cannot be read"),
        (json.dumps({**good, "token_uri": "http://169.254.169.254/computeMetadata/v1/token"}), "token_uri"),
    ]:
        refused = api.post("/api/v1/provider-accounts", {"provider": "gcp", "name": "g", "api_key": bad}, format="json")
        assert refused.status_code == 400, bad
        body = refused.json()
        assert body["error"] == "validation_error" and words in " ".join(body["fields"]["api_key"]), body
        assert good["private_key"][40:80] not in json.dumps(body)
    assert ProviderAccount.objects.count() == 0
    # the same text is a fine key for a provider whose keys are opaque strings
    assert api.post("/api/v1/provider-accounts", {"provider": "vastai", "name": "v", "api_key": "not json at all"},
                    format="json").status_code == 201


def test_an_account_a_live_standby_uses_is_a_409_and_a_finished_one_does_not_block(api, user):
    from django.utils import timezone

    from instances.models import StandbyMachine
    from tests.factories import make_instance

    account_id = api.post("/api/v1/provider-accounts", {"provider": "runpod", "name": "r", "api_key": API_KEY},
                          format="json").json()["id"]
    instance = make_instance(user, status="destroyed")
    standby = StandbyMachine.objects.create(
        instance=instance, provider="runpod", provider_account_id=account_id, provider_instance_id="pod-1",
        status="ready", label=f"{instance.label}-s1", mirror_private_key="k", mirror_public_key="ssh-ed25519 C")
    refused = api.delete(f"/api/v1/provider-accounts/{account_id}")
    # deleting it would hide a running machine from reconcile (it lists machines per account)
    assert refused.status_code == 409 and "standby" in refused.json()["detail"]
    assert ProviderAccount.objects.filter(pk=account_id).exists()

    StandbyMachine.objects.filter(pk=standby.pk).update(status="destroyed", destroyed_at=timezone.now())
    assert api.delete(f"/api/v1/provider-accounts/{account_id}").status_code == 204
    standby.refresh_from_db()
    assert standby.provider_account_id is None and standby.provider_instance_id == "pod-1"  # history kept
