"""Auto-hibernation and wake end to end: launch, the agent reports busy then idle, the instance is
hibernated with a verified snapshot and its machine destroyed; wake brings the same workspace back on
another host. Real worker, beat, web server (the agents' heartbeats), marketplace, SSH, restic and S3."""

import os
import signal
from pathlib import Path

import pytest
from django.test import override_settings

from agent import selectors as agent_selectors
from agent.models import AgentCredential
from instances.models import Instance, InstanceEvent
from instances.selectors import instances_to_presync
from instances.tasks import presync_fastpath, reconcile
from snapshots import storage
from snapshots.models import FastPathManifest, MachineKey, Snapshot, SnapshotRepository
from tests.e2e.conftest import CATALOGUES
from tests.e2e.test_race import wait_for_status
from tests.harness import celery_beat, celery_worker, wait_until
from tests.snapshots.helpers import make_workspace, manifest

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
STACK_CATALOGUE = CATALOGUES / "hibernate.yaml"
STACK_SERVICES = {"s3", "web"}
STACK_SETTINGS = {
    "RACE_BATCH_TIMEOUT_SECONDS": 20.0,
    "RACE_POLL_INTERVAL_SECONDS": 0.3,
    "IDLE_WINDOW_SECONDS": 6.0,
    "HEARTBEAT_MAX_GAP_SECONDS": 4.0,
    "HIBERNATION_SWEEP_SECONDS": 1.0,
    "AGENT_HEARTBEAT_INTERVAL_SECONDS": 1,
    "AGENT_FLUSH_INTERVAL_SECONDS": 1,
    "RECONCILE_STALE_SECONDS": 0,
    "HIBERNATE_AGENT_READY_SECONDS": 30.0,
    "SNAPSHOT_FASTPATH_PRESYNC_SECONDS": 600,
}


def launch(api, gpu_name: str) -> Instance:
    response = api.post("/api/v1/instances", {"name": gpu_name.lower(), "gpu_name": gpu_name}, format="json")
    assert response.status_code == 202, response.json()
    instance = wait_for_status(Instance.objects.get(pk=response.json()["id"]), "running", "failed")
    assert instance.status == "running", instance.status_reason
    return instance


def workspace_of(stack, instance: Instance) -> Path:
    return Path(stack.market.control.instance(instance.provider_instance_id)["workspace"])


def _story(instance: Instance) -> str:
    """What happened to an instance, for a failure message: its events, snapshots, fast paths, machine keys."""
    events = [(e.created_at.strftime("%H:%M:%S"), e.kind, e.message[:200]) for e in instance.events.order_by("id")]
    return (f"events: {events}; snapshots: {list(Snapshot.objects.filter(instance=instance).values('status', 'error'))}"
            f"; fast paths: {list(FastPathManifest.objects.filter(instance=instance).values('status', 'error'))}"
            f"; machine keys: {list(MachineKey.objects.filter(instance=instance).values('machine', 'revoked_at'))}")


def heartbeats_arrive(instance: Instance) -> bool:
    return agent_selectors.last_heartbeat_at(instance.pk) is not None


def test_idle_instance_hibernates_with_a_verified_snapshot_and_wakes_elsewhere(stack_base, api):
    stack = stack_base
    with celery_worker(stack.tmp, env=stack.env, concurrency=3):
        _hibernate_and_wake(stack, api)


def _hibernate_and_wake(stack, api):
    instance = launch(api, "HIB")
    machine_id, first_host = instance.provider_instance_id, instance.host_id
    first_host_name = stack.market.control.instance(machine_id)["host"]
    workspace = workspace_of(stack, instance)
    make_workspace(workspace, weights_mb=2, source_files=30)
    expected = manifest(workspace)

    stack.market.control.set_gpu_util(machine_id, 80)
    with celery_beat(stack.tmp, env=stack.env):
        wait_until(lambda: heartbeats_arrive(instance), timeout=120, what="the agent's heartbeats")
        # busy: the window passes and nothing happens
        wait_until(lambda: len([u for _, u in agent_selectors.heartbeats_window(instance.pk, 8) if u == 80]) >= 7,
                   timeout=60, what="a busy window of heartbeats")
        instance.refresh_from_db()
        assert instance.status == "running"
        stack.market.control.set_gpu_util(machine_id, 4.9)
        wait_for_status(instance, "hibernated", timeout=120)

    snapshot = Snapshot.objects.get(instance=instance, reason="hibernate")
    assert snapshot.status == "verified" and snapshot.verified_at
    assert stack.machines(f"{instance.label}-") == []
    hibernated = instance.events.filter(kind="status", data__to="hibernated").get()
    assert hibernated.created_at >= snapshot.verified_at  # destroyed only after the verified snapshot
    assert instance.provider_instance_id == "" and hibernated.data["host_id"] == first_host

    # the first host is gone from the market: the wake must find another and bring the workspace back
    stack.market.control.set_host(first_host_name, capacity=0)
    assert api.post(f"/api/v1/instances/{instance.pk}/wake", {}, format="json").status_code == 202
    assert api.post(f"/api/v1/instances/{instance.pk}/wake", {}, format="json").status_code == 409
    wait_for_status(instance, "running", "hibernated", timeout=120)
    assert instance.status == "running", instance.status_reason
    assert instance.host_id != first_host
    assert manifest(workspace_of(stack, instance)) == expected
    # the wake's own event comes once the task is done: after the agent's sync, which follows `running`
    wake = wait_until(lambda: InstanceEvent.objects.filter(instance=instance, kind="wake", data__has_key="timings")
                      .first(), timeout=60, what="the wake's event")
    # running as soon as the agent ran: the new machine's restic key and the agent's sync came after
    assert set(wake.data["timings"]) == {"race", "restore", "agent", "sync", "total"}
    running = instance.events.filter(kind="status", data__to="running").latest("id")
    synced = instance.events.filter(kind="agent", message="agent started with its periodic sync").latest("id")
    assert synced.id > running.id and "sync" not in running.data["timings"]
    # the hibernation stored a fast path beside restic's snapshot, and the wake restored from it
    assert snapshot.fastpath.status == "verified", snapshot.fastpath.error
    assert wake.data["restore_method"] == "fastpath" and wake.data["restore_bytes"] > 2 << 20
    assert wake.data["restore_mb_per_second"] > 0 and "MB/s" in wake.message
    assert len(stack.machines(f"{instance.label}-")) == 1
    wait_until(lambda: agent_selectors.last_heartbeat_at(instance.pk) > instance.status_changed_at, timeout=60,
               what="the new agent's heartbeats")
    stack.market.control.set_host(first_host_name, capacity=1)
    assert api.delete(f"/api/v1/instances/{instance.pk}").status_code == 202
    wait_for_status(instance, "destroyed")


def test_a_failed_snapshot_never_destroys_the_machine(stack_base, api):
    stack = stack_base
    # object storage is down for this worker: every snapshot fails
    down = {"SNAPSHOT_S3_ENDPOINT": "http://127.0.0.1:9", "SNAPSHOT_FAST_S3_ENDPOINT": "http://127.0.0.1:9"}
    with celery_worker(stack.tmp, env={**stack.env, **down}):
        instance = launch(api, "HIB-FAIL")
        machine_id = instance.provider_instance_id
        assert api.post(f"/api/v1/instances/{instance.pk}/hibernate").status_code == 202
        wait_until(lambda: InstanceEvent.objects.filter(instance=instance, kind="hibernate",
                                                        data__failed=True).exists(),
                   timeout=120, what="the hibernation to fail")
        instance = wait_for_status(instance, "running")
        assert instance.provider_instance_id == machine_id
        assert [m["id"] for m in stack.machines(f"{instance.label}-")] == [int(machine_id)]
        failed = Snapshot.objects.get(instance=instance)
        assert failed.status == "failed" and failed.error and not failed.verified_at
        assert api.delete(f"/api/v1/instances/{instance.pk}").status_code == 202
        wait_for_status(instance, "destroyed")


def test_worker_killed_mid_hibernation_never_destroys_without_a_verified_snapshot(stack_base, api):
    with celery_worker(stack_base.tmp, env=stack_base.env) as worker:
        instance = launch(api, "HIB-KILL")
        machine_id = instance.provider_instance_id
        workspace = workspace_of(stack_base, instance)
        make_workspace(workspace, weights_mb=80, source_files=200)  # a backup that takes a while (killed once it runs)
        assert api.post(f"/api/v1/instances/{instance.pk}/hibernate").status_code == 202
        wait_until(lambda: Snapshot.objects.filter(instance=instance, status="running").exists(), timeout=60,
                   what="the hibernation snapshot to start")
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)
    instance.refresh_from_db()
    assert instance.status == "hibernating"
    assert [m["id"] for m in stack_base.machines(f"{instance.label}-")] == [int(machine_id)]  # not destroyed

    with celery_worker(stack_base.tmp, env=stack_base.env):
        assert reconcile()["resumed"] == [instance.pk]
        try:
            wait_for_status(instance, "hibernated", timeout=300)  # the backup runs again, on two loaded cores
        except TimeoutError as exc:  # say what the resumed hibernation did
            raise AssertionError(f"{exc}; {_story(instance)}") from exc
    verified = Snapshot.objects.get(instance=instance, status="verified", reason="hibernate")
    hibernated = instance.events.filter(kind="status", data__to="hibernated").get()
    assert hibernated.created_at >= verified.verified_at
    assert stack_base.machines(f"{instance.label}-") == []

    # 30 minutes later the reservation is released: nothing left at the provider, the snapshot stays
    from instances.hibernation import instance_release_run

    assert instance_release_run(instance.pk) == "released"
    instance.refresh_from_db()
    assert instance.released_at is not None
    assert Snapshot.objects.filter(instance=instance, status="verified").count() == 1
    assert instance_release_run(instance.pk) == "skipped"  # once


def test_the_agent_syncs_the_workspace_and_its_snapshots_are_recorded_verified(stack_base, api):
    from instances.agent_setup import agent_syncs_record

    env = {**stack_base.env, "AGENT_SYNC_INTERVAL_SECONDS": "2"}
    with override_settings(AGENT_SYNC_INTERVAL_SECONDS=2), celery_worker(stack_base.tmp, env=env):
        instance = launch(api, "HIB-SYNC")
        # busy, so that the module's short idle window cannot hibernate it before its first sync (a fresh
        # machine's first sync waits for its own restic key to be added)
        stack_base.market.control.set_gpu_util(instance.provider_instance_id, 80)
        (workspace_of(stack_base, instance) / "notes.txt").write_text("written before the sync\n")
        started = wait_until(lambda: instance.events.filter(kind="agent").first(), timeout=120,
                             what="the agent to be started")
        assert started.message == "agent started with its periodic sync", started.message
        with celery_beat(stack_base.tmp, env=env):  # flushes heartbeats
            snapshots = wait_until(agent_syncs_record, timeout=90, what="an agent sync to be recorded")
        periodic = Snapshot.objects.get(pk=snapshots[0])
        assert periodic.reason == "periodic" and periodic.status == "verified" and periodic.verified_at
        # after its first recorded sync, the instance's fast path is brought up to date (a presync)
        assert instances_to_presync(snapshots) == [instance.pk]
        presync_fastpath.delay(instance.pk)
        presync = wait_until(lambda: FastPathManifest.objects.filter(instance=instance, snapshot=None).exclude(
            status="pending").first(), timeout=90, what="the fast-path presync")
        assert presync.status == "verified", presync.error
        assert presync.file_count >= 1 and presync.uploaded_bytes > 0
        # the agent synced with its machine's own restic key (storage keys that cannot delete)
        machine_key = MachineKey.objects.get(instance=instance)
        assert machine_key.restic_key_id and machine_key.revoked_at is None
        assert api.delete(f"/api/v1/instances/{instance.pk}").status_code == 202
        wait_for_status(instance, "destroyed")
        # the machine went: its agent secret at once, its restic key file right after (a worker task)
        assert not AgentCredential.objects.filter(instance=instance).exists()
        wait_until(lambda: MachineKey.objects.filter(pk=machine_key.pk, removed_at__isnull=False).exists(),
                   timeout=60, what="the machine's restic key to be removed")
        prefix = SnapshotRepository.objects.get(owner=instance.owner).prefix
        assert machine_key.restic_key_id not in storage.repository_keys(prefix)


def test_an_empty_workspace_hibernates_after_the_agent_is_ready_and_wakes_empty(stack_base, api):
    """Issue #13, item 7: the final pass runs once the agent answered `hibernate_ready` (no sync writes after
    it), and an empty workspace is a valid hibernation (restic refuses an empty snapshot: it used to fail
    every few minutes while the idle machine kept billing)."""
    with celery_worker(stack_base.tmp, env=stack_base.env, concurrency=3):
        instance = launch(api, "HIB-EMPTY")
        workspace = workspace_of(stack_base, instance)
        for path in workspace.iterdir():
            path.unlink()
        wait_until(lambda: heartbeats_arrive(instance), timeout=60, what="the agent's heartbeats")
        assert api.post(f"/api/v1/instances/{instance.pk}/hibernate").status_code == 202
        wait_until(lambda: instance.events.filter(kind="status", data__to="hibernating").exists(), timeout=60,
                   what="the hibernation to start")
        wait_for_status(instance, "hibernated", "running", timeout=180)
        assert instance.status == "hibernated", _story(instance)
        ready = instance.events.get(kind="hibernate", data__agent_ready=True)
        snapshot = Snapshot.objects.get(instance=instance, reason="hibernate")
        assert snapshot.status == "verified" and snapshot.stats == {"empty": True}
        assert snapshot.created_at >= ready.created_at  # the final pass came after the agent's answer
        assert stack_base.machines(f"{instance.label}-") == []

        assert api.post(f"/api/v1/instances/{instance.pk}/wake", {}, format="json").status_code == 202
        wait_for_status(instance, "running", "hibernated", timeout=120)
        assert instance.status == "running", instance.status_reason
        assert list(workspace_of(stack_base, instance).iterdir()) == []
        assert api.delete(f"/api/v1/instances/{instance.pk}").status_code == 202
        wait_for_status(instance, "destroyed")
