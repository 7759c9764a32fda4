"""User B never sees, changes or learns of user A's objects: 404 on every route, absent from lists."""

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from machines.models import MachineAttempt, ProviderAccount, SSHKey
from snapshots.models import Snapshot
from tests.factories import make_instance

pytestmark = pytest.mark.django_db


def new_public_key() -> str:
    public = Ed25519PrivateKey.generate().public_key()
    return public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


@pytest.fixture
def a_objects(user):
    instance = make_instance(user, status="running")
    return {
        "instances": instance,
        "snapshots": Snapshot.objects.create(owner=user, instance=instance, status="verified"),
        "provider-accounts": ProviderAccount.objects.create(owner=user, provider="vastai", name="main", api_key="k" * 40),
        "ssh-keys": SSHKey.objects.create(owner=user, name="laptop", public_key=new_public_key(), fingerprint="SHA256:x"),
        "attempt": MachineAttempt.objects.create(instance=instance, provider="local", host_id="h-secret", offer_id="1"),
    }


@pytest.mark.parametrize("route", ["instances", "snapshots", "provider-accounts", "ssh-keys"])
def test_other_users_object_is_a_404_and_absent_from_lists(a_objects, api, other_api, route):
    obj = a_objects[route]
    assert api.get(f"/api/v1/{route}/{obj.pk}").status_code == 200  # the owner sees it
    response = other_api.get(f"/api/v1/{route}/{obj.pk}")
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"
    listing = other_api.get(f"/api/v1/{route}").json()
    assert obj.pk not in [item["id"] for item in listing["results"]]
    assert obj.pk in [item["id"] for item in api.get(f"/api/v1/{route}").json()["results"]]


@pytest.mark.parametrize("route", ["provider-accounts", "ssh-keys"])
def test_other_user_cannot_delete(a_objects, other_api, route):
    obj = a_objects[route]
    assert other_api.delete(f"/api/v1/{route}/{obj.pk}").status_code == 404
    assert type(obj).objects.filter(pk=obj.pk).exists()


def test_machine_history_shows_only_own_attempts(a_objects, api, other_api):
    own = api.get("/api/v1/machines/history").json()
    assert [a["id"] for a in own["attempts"]] == [a_objects["attempt"].pk]
    assert own["summary"]["attempts"] == 1
    other = other_api.get("/api/v1/machines/history").json()
    assert other["attempts"] == [] and other["summary"]["attempts"] == 0


def test_snapshot_filter_by_someone_elses_instance_yields_nothing(a_objects, other_api):
    response = other_api.get(f"/api/v1/snapshots?instance={a_objects['instances'].pk}")
    assert response.status_code == 200
    assert response.json()["results"] == []


def test_standby_config_is_per_user(api, other_api):
    assert api.put("/api/v1/standby", {"enabled": True, "zone": "europe-west4-a"}, format="json").status_code == 200
    assert other_api.get("/api/v1/standby").json()["enabled"] is False
    assert api.get("/api/v1/standby").json()["zone"] == "europe-west4-a"
