"""The end-to-end harness itself: a real worker and a real beat, as subprocesses, on real Redis and PostgreSQL."""

from datetime import timedelta

import pytest
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from agent.models import Heartbeat
from agent.tasks import prune_heartbeats
from tests.factories import make_instance, make_user
from tests.harness import celery_beat, celery_worker, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_a_real_worker_runs_the_prune_task_end_to_end(tmp_path, settings):
    instance = make_instance(make_user(), status="running")
    old = timezone.now() - timedelta(hours=settings.HEARTBEAT_RETENTION_HOURS + 1)
    Heartbeat.objects.create(instance=instance, gpu_util=0, received_at=old)
    fresh = Heartbeat.objects.create(instance=instance, gpu_util=0, received_at=timezone.now())
    with celery_worker(tmp_path):
        prune_heartbeats.delay()
        wait_until(lambda: Heartbeat.objects.count() == 1, timeout=60, what="the worker to prune")
    assert list(Heartbeat.objects.values_list("id", flat=True)) == [fresh.id]


def test_beat_loads_the_code_schedule_into_the_database_scheduler(tmp_path):
    assert not PeriodicTask.objects.filter(name="prune-heartbeats").exists()
    with celery_beat(tmp_path):
        task = wait_until(lambda: PeriodicTask.objects.filter(name="prune-heartbeats").first(), timeout=60,
                          what="beat to install its schedule")
    assert task.task == "agent.tasks.prune_heartbeats"
    assert task.interval is not None and task.enabled
