"""The credential mirror (agent.mirror) and the lean WSGI path of heartbeats (agent.api.wsgi)."""

import io
import json

import pytest
from django.core.signals import request_finished, request_started
from django.db import close_old_connections, connection

import dumont.wsgi
from agent import buffer, mirror
from agent.models import AgentCredential, Heartbeat
from agent.services import agent_credential_issue
from instances.models import Instance
from instances.states import Status, transition
from tests.agent.conftest import STATUS_URL, post, reading, signed

pytestmark = pytest.mark.django_db


def mirrored(instance_id: int) -> bytes | None:
    return buffer.client().get(mirror._key(instance_id))


def beat(client, instance, secret) -> str:
    response = post(client, *signed(instance.pk, secret, reading()))
    assert response.status_code == 200
    return response.json()["action"]


def test_a_heartbeat_reads_the_mirror_not_postgresql(client, running, django_assert_num_queries):
    instance, secret = running
    assert mirrored(instance.pk) is None
    assert beat(client, instance, secret) == "none"  # a miss: PostgreSQL, then stored
    assert mirrored(instance.pk).startswith(b"running\n")
    with django_assert_num_queries(0):
        assert beat(client, instance, secret) == "none"
    # a write that bypasses the model's signals is seen only when the entry expires (AGENT_MIRROR_TTL_SECONDS)
    Instance.objects.filter(pk=instance.pk).update(status=Status.HIBERNATING)
    assert beat(client, instance, secret) == "none"
    assert 0 < buffer.client().ttl(mirror._key(instance.pk)) <= 300


def test_a_status_change_reaches_the_mirror_at_once(client, running):
    instance, secret = running
    assert beat(client, instance, secret) == "none"
    transition(instance.pk, Status.HIBERNATING)
    assert mirrored(instance.pk) is None  # invalidated by the save itself
    assert beat(client, instance, secret) == "prepare_hibernate"
    assert mirrored(instance.pk).startswith(b"hibernating\n")
    transition(instance.pk, Status.HIBERNATED)
    assert beat(client, instance, secret) == "shutdown"


def test_the_invalidation_is_repeated_after_the_commit(running, django_capture_on_commit_callbacks):
    """A heartbeat that read PostgreSQL before the commit must not leave the old status behind."""
    instance, _ = running
    with django_capture_on_commit_callbacks() as callbacks:
        transition(instance.pk, Status.HIBERNATING)
    buffer.client().set(mirror._key(instance.pk), "running\nstale")  # stored by a heartbeat meanwhile
    assert callbacks
    for callback in callbacks:
        callback()
    assert mirrored(instance.pk) is None


def test_a_read_from_before_an_invalidation_is_never_stored(running, monkeypatch):
    instance, _ = running
    read = mirror._from_postgresql

    def read_then_a_commit_lands(instance_id):
        found = read(instance_id)
        mirror._invalidate(instance_id)  # another transaction commits between our read and our store
        return found

    monkeypatch.setattr(mirror, "_from_postgresql", read_then_a_commit_lands)
    assert mirror.credential(instance.pk)[1] == "running"  # answered from what it read...
    assert mirrored(instance.pk) is None  # ...but not stored
    monkeypatch.setattr(mirror, "_from_postgresql", read)
    assert mirror.credential(instance.pk)[1] == "running"
    assert mirrored(instance.pk) is not None


def test_a_rotated_credential_takes_effect_at_once_and_redis_never_holds_the_secret(client, running, settings):
    instance, old = running
    assert beat(client, instance, old) == "none"
    new = agent_credential_issue(instance.pk)
    assert post(client, *signed(instance.pk, old, reading())).status_code == 401
    assert beat(client, instance, new) == "none"
    with connection.cursor() as cursor:
        cursor.execute("SELECT secret FROM agent_agentcredential WHERE instance_id = %s", [instance.pk])
        ciphertext = cursor.fetchone()[0]
    assert mirrored(instance.pk) == f"running\n{ciphertext}".encode()  # the encrypted secret only
    r = buffer.client()
    for key in r.scan_iter(match=f"{settings.REDIS_KEY_PREFIX}:*"):
        if r.type(key) == b"string":
            value = r.get(key) or b""
            assert new.encode() not in value and old.encode() not in value, key


def test_a_deleted_credential_is_refused_at_once(client, running):
    instance, secret = running
    assert beat(client, instance, secret) == "none"
    AgentCredential.objects.filter(instance=instance).delete()
    assert mirrored(instance.pk) is None
    assert post(client, *signed(instance.pk, secret, reading())).status_code == 401


def test_a_lost_mirror_falls_back_to_postgresql(client, running):
    instance, secret = running
    transition(instance.pk, Status.HIBERNATING)
    assert beat(client, instance, secret) == "prepare_hibernate"
    r = buffer.client()
    r.delete(*r.scan_iter(match=f"{mirror._key('*')}"))  # what a Redis flush or restart leaves
    assert beat(client, instance, secret) == "prepare_hibernate"
    assert mirrored(instance.pk).startswith(b"hibernating\n")


# ---- the lean WSGI path: what gunicorn serves -----------------------------------------------------

def wsgi(method: str, raw: bytes = b"", headers: dict[str, str] | None = None, host: str = "testserver"):
    environ = {
        "REQUEST_METHOD": method, "PATH_INFO": STATUS_URL, "SCRIPT_NAME": "", "QUERY_STRING": "",
        "SERVER_NAME": "testserver", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_HOST": host,
        "wsgi.input": io.BytesIO(raw), "wsgi.url_scheme": "http", "wsgi.errors": io.StringIO(),
        "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(len(raw)), **(headers or {}),
    }
    answer = {}

    def start_response(status, response_headers, exc_info=None):
        answer["status"], answer["headers"] = int(status.split()[0]), dict(response_headers)

    # as Django's test client does: the test's transaction must survive what Django answers itself
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        body = b"".join(dumont.wsgi.application(environ, start_response))
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)
    return answer["status"], answer["headers"], body


def test_the_wsgi_path_answers_as_the_django_view(client, running, settings):
    instance, secret = running
    cases = {
        "accepted": lambda: signed(instance.pk, secret, reading()),
        "forged": lambda: signed(instance.pk, "not-the-secret", reading()),
        "invalid": lambda: signed(instance.pk, secret, {"gpu_util": 101}),
        "not json": lambda: signed(instance.pk, secret, b"{not json"),
        "too large": lambda: signed(instance.pk, secret, reading(gpu_error="x" * 20000)),
    }
    for case, request in cases.items():
        django = post(client, *request())
        status, headers, body = wsgi("POST", *request())
        assert (status, json.loads(body)) == (django.status_code, django.json()), case
        assert headers == {**dict(django.headers), "Content-Length": str(len(body))}, case
    assert buffer.pending() == 2  # the two accepted ones, nothing else

    raw, headers = signed(instance.pk, secret, reading())
    assert wsgi("POST", raw, headers)[0] == 200
    assert wsgi("POST", raw, headers)[0] == 401  # a replay
    assert wsgi("GET")[0] == 405  # Django's answer
    assert wsgi("POST", *signed(instance.pk, secret, reading()), host="evil.example")[0] == 400  # Django's too
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    status, _, body = wsgi("POST", *signed(instance.pk, secret, reading()))
    assert status == 503 and json.loads(body)["error"] == "unavailable"
    assert not Heartbeat.objects.exists()
