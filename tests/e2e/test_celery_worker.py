"""The end-to-end harness itself: a real worker and a real beat, as subprocesses, on real Redis and PostgreSQL."""

import os
import socket
import time
from datetime import timedelta

import pytest
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from agent.auth import Agent
from agent.models import Heartbeat
from agent.services import heartbeat_record
from agent.tasks import flush_heartbeats, prune_heartbeats
from snapshots.models import Snapshot
from snapshots.tasks import take_snapshot
from tests.agent.conftest import reading
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


def test_a_queue_full_of_slow_snapshots_does_not_delay_a_flush(tmp_path):
    """Workers per queue, as production runs them: six snapshots of machines that never answer SSH
    (each waits out its connect timeout) keep the snapshot worker busy for a minute; a heartbeat flush
    queued behind them runs at once on the sweeps worker."""
    silent = socket.socket()  # accepts connections, never sends an SSH banner
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    owner = make_user()
    snapshots = []
    for _ in range(6):
        instance = make_instance(owner, status="running")
        snapshots.append(Snapshot.objects.create(
            owner=owner, instance=instance, reason="manual", ssh_host="127.0.0.1", ssh_port=silent.getsockname()[1],
            ssh_host_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"))
    try:
        with celery_worker(tmp_path, queues=("snapshots",), concurrency=1, name="worker-snapshots"), \
                celery_worker(tmp_path, queues=("sweeps",), concurrency=1, name="worker-sweeps"):
            for snapshot in snapshots:
                take_snapshot.delay(snapshot.pk)
            wait_until(lambda: Snapshot.objects.filter(status="running").exists(), timeout=60,
                       what="the snapshot worker to be busy")
            agent = Agent(instance_id=instance.pk, instance_status="running", nonce=os.urandom(16).hex())
            heartbeat_record(agent=agent, heartbeat=reading(gpu_util=12.0), received_at=time.time())
            flush_heartbeats.delay()
            wait_until(lambda: Heartbeat.objects.filter(nonce=agent.nonce).exists(), timeout=20,
                       what="the flush, while snapshots wait")
            # the flush did not wait for them: most of the slow snapshots have not even started
            assert Snapshot.objects.filter(status="pending").count() >= 3
    finally:
        silent.close()
