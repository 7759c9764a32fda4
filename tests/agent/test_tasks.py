import time
from datetime import timedelta

import pytest
from django.utils import timezone

from agent.auth import Agent
from agent.models import Heartbeat
from agent.services import heartbeat_record, heartbeats_prune
from agent.tasks import flush_heartbeats, prune_heartbeats
from tests.agent.conftest import reading
from tests.factories import make_instance, make_user

pytestmark = pytest.mark.django_db


def _beats(instance, *, hours_ago: float, count: int):
    at = timezone.now() - timedelta(hours=hours_ago)
    Heartbeat.objects.bulk_create(
        Heartbeat(instance=instance, gpu_util=50, received_at=at - timedelta(seconds=i)) for i in range(count)
    )


def test_prune_deletes_only_heartbeats_older_than_retention(settings):
    settings.HEARTBEAT_RETENTION_HOURS = 24
    instance = make_instance(make_user(), status="running")
    _beats(instance, hours_ago=25, count=30)
    _beats(instance, hours_ago=23, count=7)
    assert prune_heartbeats() == 30
    assert Heartbeat.objects.count() == 7
    assert prune_heartbeats() == 0


def test_prune_is_bounded_per_run_and_the_next_run_continues():
    instance = make_instance(make_user(), status="running")
    _beats(instance, hours_ago=100, count=25)
    assert heartbeats_prune(older_than=timedelta(hours=1), batch_size=10, max_batches=2) == 20
    assert Heartbeat.objects.count() == 5
    assert heartbeats_prune(older_than=timedelta(hours=1), batch_size=10, max_batches=2) == 5
    assert not Heartbeat.objects.exists()


def test_the_flush_task_moves_buffered_heartbeats_into_postgresql():
    instance = make_instance(make_user(), status="running")
    for nonce in ("a1" * 16, "b2" * 16):
        agent = Agent(instance_id=instance.pk, instance_status="running", nonce=nonce)
        heartbeat_record(agent=agent, heartbeat=reading(gpu_util=12.0), received_at=time.time())
    assert flush_heartbeats() == 2
    assert sorted(Heartbeat.objects.values_list("nonce", flat=True)) == ["a1" * 16, "b2" * 16]
    assert flush_heartbeats() == 0
