"""`POST /api/v1/agent/sync-credentials`: an agent renews its sync's storage keys before they expire
(`r2` keys are temporary). Signed like a heartbeat; the keys open the owner's prefix only."""

import threading
import time
from http.server import HTTPServer

import pytest

from dumont.s3server import scoped_credentials
from snapshots.models import SnapshotRepository
from snapshots.storage import scope_secret
from tests.agent.conftest import signed
from tests.snapshots.test_storage import _FakeCloudflare

pytestmark = pytest.mark.django_db
URL = "/api/v1/agent/sync-credentials"


@pytest.fixture
def repository(running, settings):
    instance, _ = running
    settings.SNAPSHOT_S3_BUCKET = "dumont-test"
    settings.SNAPSHOT_MACHINE_CREDENTIALS = "scoped"
    return SnapshotRepository.objects.create(owner=instance.owner, prefix=f"users/{instance.owner_id}/ab12",
                                             password="restic-password", initialized_at="2026-11-29T00:00:00Z")


def ask(client, instance_id: int, secret: str, **kwargs):
    raw, headers = signed(instance_id, secret, b"{}", **kwargs)
    return client.post(URL, data=raw, content_type="application/json", **headers)


def test_scoped_keys_for_the_owners_prefix_only_and_never_the_password(client, running, repository):
    instance, secret = running
    answer = ask(client, instance.pk, secret)
    assert answer.status_code == 200, answer.json()
    body = answer.json()
    expected = scoped_credentials(f"dumont-test/{repository.prefix}", scope_secret())
    assert body == {"env": {"AWS_ACCESS_KEY_ID": expected.access_key_id,
                            "AWS_SECRET_ACCESS_KEY": expected.secret_access_key}, "expires_at": None}
    assert "restic-password" not in answer.content.decode()


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
