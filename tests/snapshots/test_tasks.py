"""End to end with a real Celery worker: a snapshot requested through the API is taken on the machine,
verified, and its deletion reaches restic through the retention task."""

from __future__ import annotations

import pytest

from instances.models import InstanceEvent
from snapshots import restic, services
from snapshots.models import Snapshot, SnapshotRepository
from tests.conftest import client_for
from tests.factories import make_instance, make_user
from tests.harness import celery_worker, subprocess_env, wait_until
from tests.snapshots.conftest import snapshot_settings_env
from tests.snapshots.helpers import make_workspace

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_a_real_worker_takes_a_snapshot_requested_through_the_api(tmp_path, machines, s3, control_key, data_dir):
    user = make_user()
    api = client_for(user)
    machine = machines.start()
    make_workspace(machine.workspace, weights_mb=1, source_files=10)
    instance = make_instance(user, status="running", ssh_host="127.0.0.1", ssh_port=machine.handle.port,
                             ssh_host_key=machine.handle.host_public_key)
    env = subprocess_env(**snapshot_settings_env(s3, control_key, data_dir))

    with celery_worker(tmp_path, env=env, concurrency=1):
        response = api.post("/api/v1/snapshots", {"instance": instance.pk}, format="json")
        assert response.status_code == 202
        snapshot_id = response.json()["id"]
        snapshot = wait_until(
            lambda: Snapshot.objects.filter(pk=snapshot_id).exclude(status__in=Snapshot.ACTIVE).first(),
            timeout=90, what="the worker to finish the snapshot",
        )
        assert snapshot.status == Snapshot.Status.VERIFIED, snapshot.error

        assert api.delete(f"/api/v1/snapshots/{snapshot_id}").status_code == 204
        wait_until(lambda: Snapshot.objects.filter(pk=snapshot_id, forgotten_at__isnull=False).exists(),
                   timeout=90, what="retention to forget the deleted snapshot")

    messages = list(InstanceEvent.objects.filter(instance=instance, kind="snapshot").values_list("message", flat=True))
    assert messages[0] == f"snapshot {snapshot_id} requested"
    assert f"snapshot {snapshot_id} started (manual)" in messages
    assert messages[-1].startswith(f"snapshot {snapshot_id} verified")
    repository = SnapshotRepository.objects.get(owner=user)
    assert restic.snapshots(services._local_runner(), services._control_plane_repository(repository),
                            services.tuning()) == []
    assert repository.size_measured_at is not None
