"""`POST /api/v1/agent/sync-credentials`: an agent renews its sync's storage keys before they expire
(`r2` keys are temporary). Signed like a heartbeat; the keys open the owner's prefix only."""

import threading
import time
from http.server import HTTPServer

import pytest

from dumont.s3server import machine_key_of
from snapshots.models import MachineKey, SnapshotRepository
from snapshots.services import machine_of
from tests.agent.conftest import STATUS_URL, signed
from tests.snapshots.test_storage import _FakeCloudflare

pytestmark = pytest.mark.django_db
URL = "/api/v1/agent/sync-credentials"


@pytest.fixture
def repository(running, settings):
    instance, _ = running
    settings.SNAPSHOT_S3_BUCKET = "dumont-test"
    settings.SNAPSHOT_MACHINE_CREDENTIALS = "scoped"
    repository = SnapshotRepository.objects.create(owner=instance.owner, prefix=f"users/{instance.owner_id}/ab12",
                                                   password="restic-password", initialized_at="2026-11-29T00:00:00Z")
    machine_key_for(instance, repository)
    return repository


def machine_key_for(instance, repository) -> MachineKey:
    """The live restic key of the instance's machine (as snapshots.services.machine_key_ensure leaves it)."""
    if not instance.ssh_host_key:
        instance.ssh_host_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHostKeyOfTheMachine"
        instance.save(update_fields=["ssh_host_key"])
    return MachineKey.objects.create(repository=repository, instance=instance, machine=machine_of(instance.ssh_target),
                                     password="machine-password", restic_key_id="ab" * 32)


def ask(client, instance_id: int, secret: str, **kwargs):
    raw, headers = signed(instance_id, secret, b"{}", path=URL, **kwargs)
    return client.post(URL, data=raw, content_type="application/json", **headers)


def test_scoped_keys_for_the_owners_prefix_only_expiring_and_never_a_password(client, running, repository, settings):
    instance, secret = running
    settings.AGENT_SYNC_CREDENTIALS_TTL_SECONDS = 3600
    answer = ask(client, instance.pk, secret)
    assert answer.status_code == 200, answer.json()
    body = answer.json()
    assert set(body["env"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    key = machine_key_of(body["env"]["AWS_ACCESS_KEY_ID"])
    machine_key = MachineKey.objects.get(instance=instance)
    assert (key.scope, key.holder) == (f"dumont-test/{repository.prefix}", machine_key.label)
    assert 3500 < key.expires_at - time.time() <= 3600 and abs(body["expires_at"] - key.expires_at) < 2
    assert "restic-password" not in answer.content.decode() and "machine-password" not in answer.content.decode()


def test_r2_keys_are_temporary_and_say_when_they_expire(client, running, repository, settings):
    instance, secret = running
    server = HTTPServer(("127.0.0.1", 0), _FakeCloudflare)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        settings.SNAPSHOT_MACHINE_CREDENTIALS = "r2"
        settings.SNAPSHOT_R2_API_URL = f"http://127.0.0.1:{server.server_port}/client/v4"
        settings.SNAPSHOT_R2_ACCOUNT_ID, settings.SNAPSHOT_R2_API_TOKEN = "acct", "parent-token"
        settings.AGENT_SYNC_CREDENTIALS_TTL_SECONDS = 7200
        body = ask(client, instance.pk, secret).json()
    finally:
        server.shutdown()
    assert body["env"] == {"AWS_ACCESS_KEY_ID": "tmp-id", "AWS_SECRET_ACCESS_KEY": "tmp-secret",
                           "AWS_SESSION_TOKEN": "tmp-token"}
    assert 7100 < body["expires_at"] - time.time() <= 7200
    request = _FakeCloudflare.requests[-1]["body"]
    assert request["prefixes"] == [f"{repository.prefix}/"] and request["ttlSeconds"] == 7200


def test_forged_replayed_or_finished_instances_get_nothing(client, running, repository, other_user):
    from agent.services import agent_credential_issue
    from tests.factories import make_instance

    instance, secret = running
    assert ask(client, instance.pk, "not-the-secret").status_code == 401
    assert ask(client, instance.pk, secret, timestamp=time.time() - 3600).status_code == 401
    nonce = "ab" * 16
    assert ask(client, instance.pk, secret, nonce=nonce).status_code == 200
    assert ask(client, instance.pk, secret, nonce=nonce).status_code == 401  # replay
    # another user's instance signs for itself: it cannot ask as this one
    theirs = make_instance(other_user, status="running")
    assert ask(client, instance.pk, agent_credential_issue(theirs.pk)).status_code == 401
    instance.status = "destroyed"
    instance.save(update_fields=["status"])
    refused = ask(client, instance.pk, secret)
    assert refused.status_code == 401
    assert refused.json() == {"error": "not_authenticated", "detail": "Authentication failed."}


def test_no_repository_yet_is_a_503_the_agent_retries(client, running, settings):
    instance, secret = running
    answer = ask(client, instance.pk, secret)
    assert answer.status_code == 503 and answer.json()["error"] == "unavailable"


def test_a_machine_that_goes_loses_its_secret_and_its_storage_keys_at_once(client, running, repository):
    """Hibernated (its machine destroyed), then waking (HOLDS_MACHINE again, racing for a new one): the old
    machine's agent secret opens nothing, neither storage keys nor heartbeats, and its restic key is revoked."""
    from instances.lifecycle import MACHINE_FIELDS_CLEARED
    from instances.states import transition
    from tests.agent.conftest import post, reading

    instance, secret = running
    assert ask(client, instance.pk, secret).status_code == 200
    transition(instance.pk, "hibernating", expected="running")
    assert ask(client, instance.pk, secret).status_code == 200  # still its machine: the snapshot runs now
    transition(instance.pk, "hibernated", expected="hibernating", **MACHINE_FIELDS_CLEARED)
    transition(instance.pk, "waking", expected="hibernated")
    assert ask(client, instance.pk, secret).status_code == 401
    assert post(client, *signed(instance.pk, secret, reading())).status_code == 401
    assert MachineKey.objects.get(instance=instance).revoked_at is not None


def test_a_replaced_machine_loses_its_keys_the_new_one_keeps_its_own(running, repository):
    from instances.states import transition
    from snapshots.services import MachineGone, machine_key_ensure

    instance, _ = running
    old_key = MachineKey.objects.get(instance=instance)
    new_host_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAITheReplacementMachine"
    transition(instance.pk, "recovering", expected="running", ssh_host_key=new_host_key)
    old_key.refresh_from_db()
    assert old_key.revoked_at is not None
    instance.refresh_from_db()
    assert machine_of(instance.ssh_target) != old_key.machine
    # the old machine never gets a key again, whatever asks for one
    old_target = type(instance.ssh_target)("h", 22, "root", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHostKeyOfTheMachine")
    with pytest.raises(MachineGone):
        machine_key_ensure(repository=repository, instance_id=instance.pk, target=old_target)


def test_a_captured_heartbeat_cannot_be_replayed_to_sync_credentials(client, running, repository):
    """The signature names the endpoint: a heartbeat's signature (captured on the wire) opens nothing else."""
    instance, secret = running
    raw, headers = signed(instance.pk, secret, b"{}")  # signed for POST /api/v1/agent/status
    answer = client.post(URL, data=raw, content_type="application/json", **headers)
    assert answer.status_code == 401 and "env" not in answer.json()
    # and the other way round: keys asked for are no heartbeat
    raw, headers = signed(instance.pk, secret, b'{"gpu_util": 0}', path=URL)
    answer = client.post(STATUS_URL, data=raw, content_type="application/json", **headers)
    assert answer.status_code == 401
