"""POST /api/v1/agent/status and GET /api/v1/health through Django's test client (real Redis, real PostgreSQL)."""

import time

import pytest
from django.db import connection

from agent import buffer, selectors
from agent.models import AgentCredential, Heartbeat
from agent.services import agent_credential_issue
from agent.tasks import flush_heartbeats
from instances.states import Status, transition
from tests.agent.conftest import STATUS_URL, agent_keys, post, reading, signed
from tests.factories import make_instance, make_user

pytestmark = pytest.mark.django_db

UNAUTHORIZED = {"error": "not_authenticated", "detail": "Authentication failed."}


def test_a_valid_heartbeat_is_answered_buffered_and_flushed_into_postgresql(client, running):
    instance, secret = running
    body = reading(gpu_util=37.5, sync={"state": "idle", "runs": 2, "last": {"exit_code": 0, "snapshot_id": "ab12"}})
    raw, headers = signed(instance.pk, secret, body)
    response = post(client, raw, headers)
    assert response.status_code == 200
    assert response.json() == {"action": "none", "interval": 10}
    assert buffer.pending() == 1 and not Heartbeat.objects.exists()
    assert selectors.latest_heartbeat(instance.pk)["gpu_util"] == 37.5  # readable before the flush

    assert flush_heartbeats() == 1
    row = Heartbeat.objects.get()
    assert (row.instance_id, row.gpu_util, row.agent_state) == (instance.pk, 37.5, "running")
    assert row.nonce == headers["HTTP_X_DUMONT_NONCE"]
    assert row.gpu_metrics["gpus"][0]["mem_total_mb"] == 24576 and row.gpu_metrics["source"] == "nvml"
    assert row.sync["last"]["snapshot_id"] == "ab12"
    assert abs(row.agent_time.timestamp() - body["time"]) < 1e-3
    assert abs(time.time() - row.received_at.timestamp()) < 5
    assert buffer.pending() == 0
    assert selectors.heartbeats_window(instance.pk, 60) == [(row.received_at, 37.5)]
    assert selectors.last_heartbeat_at(instance.pk) == row.received_at


def _forgeries(instance, secret, other, other_secret):
    body = reading()
    now = time.time()
    raw, good = signed(instance.pk, secret, body)
    yield "wrong secret", *signed(instance.pk, "not-the-secret", body)
    # a machine that knows its own secret must not speak for another instance
    yield "another instance's credential", *signed(other.pk, other_secret, body, header_instance=instance.pk)
    yield "signed for another instance", *signed(instance.pk, other_secret, body)
    yield "timestamp older than 5 minutes", *signed(instance.pk, secret, body, timestamp=now - 301)
    yield "timestamp in the future", *signed(instance.pk, secret, body, timestamp=now + 60)
    yield "body changed after signing", raw.replace(b"37.5", b"0.0"), good
    for header in good:
        yield f"missing {header}", raw, {k: v for k, v in good.items() if k != header}
    yield "signature not hex", raw, {**good, "HTTP_X_DUMONT_SIGNATURE": "z" * 64}
    yield "unknown instance", *signed(999_999_999, secret, body)


def test_forged_heartbeats_are_refused_alike_and_change_nothing(client, running):
    instance, secret = running
    other = make_instance(make_user(), status="running")
    other_secret = agent_credential_issue(other.pk)
    for case, raw, headers in _forgeries(instance, secret, other, other_secret):
        response = post(client, raw, headers)
        assert response.status_code == 401, case
        assert response.json() == UNAUTHORIZED, case
        assert agent_keys() == [], case  # no nonce remembered, nothing buffered
    assert flush_heartbeats() == 0
    assert not Heartbeat.objects.exists()


def test_a_replayed_heartbeat_is_refused_and_stored_once(client, running):
    instance, secret = running
    raw, headers = signed(instance.pk, secret, reading())
    assert post(client, raw, headers).status_code == 200
    replay = post(client, raw, headers)
    assert replay.status_code == 401 and replay.json() == UNAUTHORIZED
    assert buffer.pending() == 1
    assert flush_heartbeats() == 1 and Heartbeat.objects.count() == 1


def test_an_instance_without_credential_cannot_heartbeat(client):
    instance = make_instance(make_user(), status="running")
    secret = agent_credential_issue(instance.pk)
    AgentCredential.objects.filter(instance=instance).delete()
    assert post(client, *signed(instance.pk, secret, reading())).status_code == 401


def test_a_rotated_secret_takes_effect_at_once(client, running):
    instance, old = running
    assert post(client, *signed(instance.pk, old, reading())).status_code == 200  # cached in this process now
    new = agent_credential_issue(instance.pk)
    assert new != old
    assert post(client, *signed(instance.pk, old, reading())).status_code == 401
    assert post(client, *signed(instance.pk, new, reading())).status_code == 200
    credential = AgentCredential.objects.get(instance=instance)
    assert credential.rotated_at is not None
    with connection.cursor() as cursor:  # encrypted at rest
        cursor.execute("SELECT secret FROM agent_agentcredential WHERE instance_id = %s", [instance.pk])
        assert new not in cursor.fetchone()[0]


@pytest.mark.parametrize(("body", "field"), [
    ({"gpus": []}, "gpu_util"),  # no gpu_util at all: "no reading" must be said (null), not implied
    ({"gpu_util": 101}, "gpu_util"),
    ({"gpu_util": "12"}, "gpu_util"),
    ({"gpu_util": True}, "gpu_util"),
    ({"gpu_util": 5, "gpus": [{"index": -1}]}, "gpus[0].index"),
    ({"gpu_util": 5, "gpus": [{"index": 0, "util": 400}]}, "gpus[0].util"),
    ({"gpu_util": 5, "gpus": {"index": 0}}, "gpus"),
    ({"gpu_util": 5, "state": "asleep"}, "state"),
    ({"gpu_util": 5, "sync": "ok"}, "sync"),
    ({"gpu_util": 5, "time": "yesterday"}, "time"),
    # poison: numbers PostgreSQL (or float()) cannot take, and numbers no GPU or clock reads
    (b'{"gpu_util": 1, "time": 1e999}', "time"),
    (b'{"gpu_util": 1e999}', "gpu_util"),
    (b'{"gpu_util": NaN}', "gpu_util"),
    (b'{"gpu_util": -Infinity}', "gpu_util"),
    (b'{"gpu_util": 1' + b"0" * 400 + b"}", "gpu_util"),
    (b'{"gpu_util": 1, "gpus": [{"index": 0, "mem_used_mb": 1' + b"0" * 400 + b"}]}", "gpus[0].mem_used_mb"),
    ({"gpu_util": 5, "time": time.time() - 2 * 86400}, "time"),
    ({"gpu_util": 5, "time": time.time() + 2 * 86400}, "time"),
    ({"gpu_util": 5, "time": 0}, "time"),
    ({"gpu_util": 5, "gpus": [{"index": 10**6}]}, "gpus[0].index"),
    ({"gpu_util": 5, "gpus": [{"index": 0, "mem_used_mb": 30000, "mem_total_mb": 24576}]}, "gpus[0].mem_used_mb"),
    ({"gpu_util": 5, "gpus": [{"index": 0, "mem_total_mb": 1e12}]}, "gpus[0].mem_total_mb"),
    (b'{"gpu_util": 5, "sync": {"last": {"duration": Infinity}}}', "sync"),
    (b'{"gpu_util": 5, "sync": {"last": {"duration": 1e999}}}', "sync"),
])
def test_a_malformed_heartbeat_is_a_400_naming_the_field(client, running, body, field):
    instance, secret = running
    response = post(client, *signed(instance.pk, secret, body))
    assert response.status_code == 400
    data = response.json()
    assert data["error"] == "validation_error" and list(data["fields"]) == [field]
    assert field in data["detail"]
    assert buffer.pending() == 0


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]"])
def test_a_body_that_is_not_a_json_object_is_a_parse_error(client, running, raw):
    instance, secret = running
    response = post(client, *signed(instance.pk, secret, raw))
    assert response.status_code == 400 and response.json()["error"] == "parse_error"


def test_a_missing_reading_is_stored_as_missing_never_as_zero(client, running):
    instance, secret = running
    body = reading(gpu_util=None, gpus=[], gpu_source="file", gpu_error="cannot read /x: No such file")
    assert post(client, *signed(instance.pk, secret, body)).status_code == 200
    flush_heartbeats()
    row = Heartbeat.objects.get()
    assert row.gpu_util is None and "No such file" in row.gpu_metrics["error"]
    assert selectors.heartbeats_window(instance.pk, 60) == [(row.received_at, None)]


def test_the_action_follows_the_instance_status(client, running):
    instance, secret = running

    def action():
        response = post(client, *signed(instance.pk, secret, reading()))
        assert response.status_code == 200
        return response.json()["action"]

    assert action() == "none"
    transition(instance.pk, Status.HIBERNATING)
    assert action() == "prepare_hibernate"
    transition(instance.pk, Status.RUNNING)  # hibernation called off
    assert action() == "none"
    transition(instance.pk, Status.HIBERNATING)
    transition(instance.pk, Status.HIBERNATED)
    assert action() == "shutdown"


@pytest.mark.parametrize(("status", "action"), [
    ("launching", "none"), ("paused", "none"), ("waking", "none"),
    ("destroying", "shutdown"), ("destroyed", "shutdown"), ("failed", "shutdown"),
])
def test_every_status_has_its_action(client, status, action):
    instance = make_instance(make_user(), status=status)
    secret = agent_credential_issue(instance.pk)
    response = post(client, *signed(instance.pk, secret, reading()))
    assert response.json()["action"] == action


def test_redis_down_is_a_503_and_nothing_is_stored(client, running, settings):
    instance, secret = running
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    response = post(client, *signed(instance.pk, secret, reading()))
    assert response.status_code == 503
    assert not Heartbeat.objects.exists()


def test_only_post_and_small_bodies(client, running, settings):
    instance, secret = running
    assert client.get(STATUS_URL).status_code == 405
    settings.AGENT_MAX_BODY_BYTES = 100
    response = post(client, *signed(instance.pk, secret, reading(gpu_error="x" * 200)))
    assert response.status_code == 413


def test_health_needs_no_authentication_and_no_database(client, django_assert_num_queries):
    with django_assert_num_queries(0):
        response = client.get("/api/v1/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_more_heartbeats_than_the_interval_allows_are_a_429_that_stores_nothing(client, running, settings):
    settings.AGENT_HEARTBEATS_PER_INTERVAL = 2
    instance, secret = running
    assert [post(client, *signed(instance.pk, secret, reading())).status_code for _ in range(2)] == [200, 200]
    refused = post(client, *signed(instance.pk, secret, reading(gpu_util=0.0)))
    assert refused.status_code == 429 and refused.json()["error"] == "throttled"
    assert 0 < int(refused["Retry-After"]) <= settings.AGENT_HEARTBEAT_INTERVAL_SECONDS
    assert buffer.pending() == 2
    assert buffer.latest(instance.pk)["u"] == 37.5  # the refused "0 %" reading is nowhere
