"""The Redis -> PostgreSQL path: concurrent flushers, a flusher killed mid-batch, deleted instances,
and the selectors the hibernation work reads."""

import json
import os
import threading
import time
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone
from rest_framework.test import APIClient

from agent import buffer, selectors, services
from agent.auth import Agent
from agent.models import Heartbeat
from tests.agent.conftest import reading
from tests.factories import make_instance, make_user


@pytest.fixture(autouse=True)
def _no_heartbeat_limit(settings):
    """These tests send hundreds of heartbeats per instance at once, to test the flush."""
    settings.AGENT_HEARTBEATS_PER_INTERVAL = 0


def _record(instance, count: int, *, gpu_util: float | None = 50.0) -> list[str]:
    nonces = []
    for _ in range(count):
        nonce = os.urandom(16).hex()
        agent = Agent(instance_id=instance.pk, instance_status=instance.status, nonce=nonce)
        services.heartbeat_record(agent=agent, heartbeat=reading(gpu_util=gpu_util), received_at=time.time())
        nonces.append(nonce)
    return nonces


@pytest.mark.django_db(transaction=True)
def test_two_flushers_at_once_store_every_heartbeat_exactly_once():
    instances = [make_instance(make_user(), status="running") for _ in range(3)]
    nonces = [n for instance in instances for n in _record(instance, 400)]
    results = []

    def flusher():
        results.append(services.heartbeats_flush(batch_size=50))
        connection.close()

    threads = [threading.Thread(target=flusher) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sum(results) == 1200 and all(results)  # both took part
    assert sorted(Heartbeat.objects.values_list("nonce", flat=True)) == sorted(nonces)
    assert buffer.pending() == 0


@pytest.mark.django_db
def test_a_batch_whose_flusher_died_is_put_back_and_flushed_once(settings):
    instance = make_instance(make_user(), status="running")
    nonces = _record(instance, 30)
    died_before_insert = buffer.batch_claim(10)
    died_after_insert = buffer.batch_claim(10)
    services._insert(died_after_insert.records)  # committed, never acknowledged
    assert Heartbeat.objects.count() == 10

    assert services.heartbeats_flush() == 10  # the unclaimed rest; the claimed batches are not stale yet
    assert Heartbeat.objects.count() == 20 and buffer.pending() == 20
    settings.AGENT_FLUSH_STALE_SECONDS = 0
    assert services.heartbeats_flush() == 20
    assert sorted(Heartbeat.objects.values_list("nonce", flat=True)) == sorted(nonces)
    assert buffer.pending() == 0
    assert died_before_insert.token != died_after_insert.token


@pytest.mark.django_db
def test_heartbeats_of_a_deleted_instance_are_dropped_the_rest_stored():
    gone = make_instance(make_user(), status="running")
    kept = make_instance(make_user(), status="running")
    _record(gone, 3)
    kept_nonces = _record(kept, 3)
    gone.delete()
    assert services.heartbeats_flush() == 6
    assert sorted(Heartbeat.objects.values_list("nonce", flat=True)) == sorted(kept_nonces)


@pytest.mark.django_db
def test_a_row_postgresql_refuses_is_set_aside_and_every_other_row_is_stored():
    """One poisoned heartbeat (buffered before validation refused it, or by a bug) must not hold back
    the fleet's: the good rows go in, the bad one to the dead-letter list with its reason."""
    owner = make_user()
    poisoned, other = make_instance(owner, status="running"), make_instance(make_user(), status="running")
    good = _record(poisoned, 5) + _record(other, 5)
    # as Redis would hold them: a time PostgreSQL cannot convert, JSON jsonb refuses, no JSON at all
    bad = [{"i": poisoned.pk, "r": time.time(), "n": "bad-1", "u": 1, "m": {}, "s": None, "a": "running", "t": 1e300},
           '{"i": ' + str(poisoned.pk) + ', "r": 1767000000, "n": "bad-2", "u": 1, "m": {}, "s": {"d": NaN}, '
           '"a": "running", "t": null}', "not json"]
    client_ = buffer.client()
    for record in bad:
        client_.lpush(buffer.key("buffer"), record if isinstance(record, str) else json.dumps(record))
    good += _record(other, 5)

    assert services.heartbeats_flush(batch_size=7) == 18
    assert sorted(Heartbeat.objects.values_list("nonce", flat=True)) == sorted(good)
    assert buffer.pending() == 0
    letters = buffer.dead_letters()
    assert len(letters) == 3 and all(letter["reason"] for letter in letters)
    assert {letter["instance"] for letter in letters} == {poisoned.pk, 0}
    assert any("bad-1" in letter["record"] for letter in letters)

    api = APIClient()
    api.force_authenticate(owner)
    assert api.get("/api/v1/metrics").json()["heartbeats_set_aside"] == 2
    other_api = APIClient()
    other_api.force_authenticate(other.owner)
    assert other_api.get("/api/v1/metrics").json()["heartbeats_set_aside"] == 0


@pytest.mark.django_db
def test_a_full_buffer_asks_for_a_flush_once(settings):
    settings.AGENT_FLUSH_BATCH_SIZE = 3
    instance = make_instance(make_user(), status="running")
    _record(instance, 2)
    assert not buffer.client().exists(buffer.key("flush-requested"))
    _record(instance, 3)  # the third and later ones find the flush already asked for
    assert buffer.client().exists(buffer.key("flush-requested"))
    services.heartbeats_flush()
    assert not buffer.client().exists(buffer.key("flush-requested"))  # the next full buffer asks again


@pytest.mark.django_db
def test_window_and_last_heartbeat_read_postgresql_and_redis():
    instance = make_instance(make_user(), status="running")
    now = timezone.now()
    Heartbeat.objects.bulk_create([
        Heartbeat(instance=instance, gpu_util=1.0, received_at=now - timedelta(seconds=300)),
        Heartbeat(instance=instance, gpu_util=None, received_at=now - timedelta(seconds=20)),
        Heartbeat(instance=instance, gpu_util=3.0, received_at=now - timedelta(seconds=10)),
    ])
    other = make_instance(make_user(), status="running")
    Heartbeat.objects.create(instance=other, gpu_util=99.0, received_at=now)
    window = selectors.heartbeats_window(instance.pk, 60)
    assert [util for _, util in window] == [None, 3.0]  # oldest first, a missing reading stays missing
    assert selectors.last_heartbeat_at(instance.pk) == now - timedelta(seconds=10)  # nothing in Redis: PostgreSQL

    _record(instance, 1, gpu_util=None)
    latest = selectors.latest_heartbeat(instance.pk)
    assert latest["gpu_util"] is None and latest["agent_state"] == "running"
    assert selectors.last_heartbeat_at(instance.pk) == latest["received_at"] > now - timedelta(seconds=5)
    assert selectors.last_heartbeat_at(make_instance(make_user()).pk) is None


@pytest.mark.django_db
def test_issuing_a_credential_creates_then_rotates():
    instance = make_instance(make_user(), status="running")
    first = services.agent_credential_issue(instance.pk)
    second = services.agent_credential_issue(instance.pk)
    assert len(first) >= 40 and first != second
    assert instance.agent_credential.secret == second
