"""Lost machines end to end: recovery from the last snapshot, late heartbeats, and the CPU standby
(mirror, failover, failback, drill, provisioning failure). Real worker, beat, web server (heartbeats),
marketplace (its crash endpoint kills a machine: sshd and every process gone, the API says offline),
SSH, rsync, restic and S3. Every test ends with the marketplace holding exactly what the database owns."""

import contextlib
import os
import signal
from pathlib import Path

import pytest
from django.utils import timezone

from agent import selectors as agent_selectors
from instances.models import Instance, StandbyMachine
from machines.models import MachineAttempt, MachineStats
from snapshots.models import Snapshot
from tests.e2e.conftest import CATALOGUES
from tests.e2e.test_hibernation import heartbeats_arrive, launch, workspace_of
from tests.e2e.test_race import wait_for_status
from tests.harness import wait_until
from tests.snapshots.helpers import make_workspace, manifest

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
STACK_CATALOGUE = CATALOGUES / "lost.yaml"
STACK_SERVICES = {"s3", "web", "beat"}
LOST_AFTER = 8.0
STACK_SETTINGS = {
    "RACE_BATCH_TIMEOUT_SECONDS": 20.0,
    "RACE_POLL_INTERVAL_SECONDS": 0.3,
    "AGENT_HEARTBEAT_INTERVAL_SECONDS": 1,
    "AGENT_FLUSH_INTERVAL_SECONDS": 1,
    "IDLE_WINDOW_SECONDS": 3600.0,  # these machines idle at 0% GPU: no hibernation here
    "LOST_MACHINE_SECONDS": LOST_AFTER,
    "LOST_SWEEP_SECONDS": 2.0,  # not faster: ten test workers share two cores
    "LOST_SSH_TIMEOUT_SECONDS": 3.0,
    "STANDBY_SWEEP_SECONDS": 2.0,
    "STANDBY_RETRY_SECONDS": 600.0,
    "RECONCILE_STALE_SECONDS": 0,
}


def machine_ids(stack, instance: Instance) -> set[str]:
    return {str(m["id"]) for m in stack.machines(f"{instance.label}-")}


def owned_ids(instance: Instance) -> set[str]:
    """What the database says the instance rents: its GPU machine and its live standby."""
    instance.refresh_from_db()
    ids = {instance.provider_instance_id} - {""}
    ids |= set(StandbyMachine.objects.filter(instance=instance, status__in=StandbyMachine.ACTIVE)
               .values_list("provider_instance_id", flat=True))
    return ids


def assert_no_leak(stack, instance: Instance) -> None:
    wait_until(lambda: machine_ids(stack, instance) == owned_ids(instance), timeout=60,
               what="the marketplace to hold exactly what the database owns")


def destroy(stack, api, instance: Instance) -> None:
    assert api.delete(f"/api/v1/instances/{instance.pk}").status_code == 202
    wait_for_status(instance, "destroyed", timeout=120)
    assert machine_ids(stack, instance) == set()


def take_snapshot(api, instance: Instance) -> Snapshot:
    response = api.post("/api/v1/snapshots", {"instance": instance.pk}, format="json")
    assert response.status_code == 202, response.json()
    snapshot = wait_until(lambda: Snapshot.objects.filter(pk=response.json()["id"], status__in=["verified", "failed"])
                          .first(), timeout=240, what="the snapshot to finish")
    assert snapshot.status == "verified", snapshot.error
    return snapshot


def standby_workspace(stack, standby: StandbyMachine) -> Path:
    return Path(stack.market.control.instance(standby.provider_instance_id)["workspace"])


def synced_after(instance: Instance, moment) -> StandbyMachine:
    """The ready standby, once a sync that started after `moment` has finished."""
    return wait_until(lambda: StandbyMachine.objects.filter(instance=instance, status="ready",
                                                            last_sync_at__gt=moment).first(),
                      timeout=90, what="a standby sync after the change")


def first_sync(instance: Instance) -> StandbyMachine:
    return wait_until(lambda: StandbyMachine.objects.filter(instance=instance, status="ready",
                                                            last_sync_at__isnull=False).first(),
                      timeout=120, what="the standby's first sync")


def enable_standby(api, **changes) -> None:
    body = {"enabled": True, "provider": "local", "sync_interval_seconds": 10, "disk_gb": 10,
            "auto_failover": True, "auto_recovery": False, **changes}
    response = api.put("/api/v1/standby", body, format="json")
    assert response.status_code == 200, response.json()


# ---- without standby ----------------------------------------------------------------------------


def test_a_lost_machine_recovers_on_a_new_host_from_its_last_snapshot(stack, api):
    instance = launch(api, "LOST")
    lost_host, lost_machine = instance.host_id, instance.provider_instance_id
    workspace = workspace_of(stack, instance)
    make_workspace(workspace, weights_mb=2, source_files=20)
    expected = manifest(workspace)
    wait_until(lambda: heartbeats_arrive(instance), timeout=60, what="the agent's heartbeats")
    snapshot = take_snapshot(api, instance)
    (workspace / "written-after-the-snapshot.txt").write_text("this work is lost with the machine\n")

    stack.market.control.crash(lost_machine)
    wait_for_status(instance, "recovering", timeout=60)
    wait_for_status(instance, "running", "hibernated", timeout=180)
    assert instance.status == "running", instance.status_reason
    assert instance.host_id != lost_host

    # the new machine holds exactly the snapshot's workspace
    assert manifest(workspace_of(stack, instance)) == expected
    lost = instance.events.get(kind="lost", data__lost=True)
    assert lost.data["host_id"] == lost_host and lost.data["provider_status"] == "offline"
    recovery = wait_until(lambda: instance.events.filter(kind="recovery").first(), timeout=60,
                          what="the recovery's event (written once its task is done)")
    assert recovery.data["snapshot"] == snapshot.pk
    assert recovery.data["work_lost_seconds"] >= 0
    assert set(recovery.data["timings"]) == {"race", "restore", "agent", "sync", "total"}
    # never mistaken for idleness
    assert not instance.events.filter(kind="status", data__to="hibernated").exists()

    # the lost host's reliability records the failure
    assert MachineAttempt.objects.filter(instance=instance, host_id=lost_host, outcome="machine_lost").count() == 1
    assert MachineStats.objects.get(provider="local", host_id=lost_host).failures >= 1
    wait_until(lambda: agent_selectors.last_heartbeat_at(instance.pk) > instance.status_changed_at, timeout=60,
               what="the new agent's heartbeats")
    assert lost_machine not in machine_ids(stack, instance)
    assert_no_leak(stack, instance)
    destroy(stack, api, instance)


def _agent_group(stack, instance: Instance) -> int:
    machine_dir = Path(stack.market.control.instance(instance.provider_instance_id)["workspace"]).parent
    return int((machine_dir / "home" / ".dumont-agent" / "supervisor.pid").read_text())


def test_late_heartbeats_and_a_silent_agent_on_a_live_machine_are_not_a_lost_machine(stack, api):
    instance = launch(api, "LATE")
    machine_id = instance.provider_instance_id
    wait_until(lambda: heartbeats_arrive(instance), timeout=60, what="the agent's heartbeats")
    group = _agent_group(stack, instance)

    # late: silent for less than the threshold, then heartbeats again
    os.killpg(group, signal.SIGSTOP)
    try:
        wait_until(lambda: (timezone.now() - agent_selectors.last_heartbeat_at(instance.pk)).total_seconds() > 3,
                   timeout=30, what="3 s without heartbeats")
    finally:
        os.killpg(group, signal.SIGCONT)
    resumed = timezone.now()
    wait_until(lambda: agent_selectors.last_heartbeat_at(instance.pk) > resumed, timeout=30,
               what="heartbeats again")
    instance.refresh_from_db()
    assert instance.status == "running" and instance.provider_instance_id == machine_id
    assert not instance.events.filter(kind="lost").exists()

    # silent past the threshold, but the machine answers: not lost, the agent is restarted
    os.killpg(group, signal.SIGSTOP)
    try:
        alive = wait_until(lambda: instance.events.filter(kind="lost", data__alive=True).first(), timeout=150,
                           what="the check to find the machine alive")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)  # the frozen agent (the redeploy may have killed it already)
    assert alive.data["provider_status"] == "running"
    wait_until(lambda: agent_selectors.last_heartbeat_at(instance.pk) > alive.created_at, timeout=60,
               what="the restarted agent's heartbeats")
    instance.refresh_from_db()
    assert instance.status == "running" and instance.provider_instance_id == machine_id
    assert not instance.events.filter(kind="lost", data__lost=True).exists()
    assert not MachineAttempt.objects.filter(instance=instance, outcome="machine_lost").exists()
    destroy(stack, api, instance)


# ---- with a CPU standby ---------------------------------------------------------------------------


def test_the_standby_mirrors_takes_over_on_a_crash_and_fails_back_to_a_new_gpu(stack, api):
    enable_standby(api)
    instance = launch(api, "STBY")
    lost_host = instance.host_id
    standby = first_sync(instance)
    mirror = standby_workspace(stack, standby)
    workspace = workspace_of(stack, instance)
    make_workspace(workspace, weights_mb=2, source_files=20)
    (workspace / "deleted-later.txt").write_text("gone before the crash\n")
    synced_after(instance, timezone.now())
    assert manifest(mirror) == manifest(workspace)

    # incremental, deletions mirrored too
    (workspace / "deleted-later.txt").unlink()
    (workspace / "notes.txt").write_text("written before the last sync\n")
    standby = synced_after(instance, timezone.now())
    expected = manifest(workspace)
    assert manifest(mirror) == expected and not (mirror / "deleted-later.txt").exists()

    status = api.get("/api/v1/standby/status").json()
    row = next(r for r in status["instances"] if r["instance"] == instance.pk)
    assert row["standby"]["status"] == "ready" and row["standby"]["id"] == standby.pk
    assert row["lag_seconds"] is not None and row["lag_seconds"] < 60
    assert "mirror_private_key" not in row["standby"]

    stack.market.control.crash(instance.provider_instance_id)
    wait_for_status(instance, "failover", timeout=60)
    body = api.get(f"/api/v1/instances/{instance.pk}").json()
    assert body["ssh"] == {"on": "standby", "host": standby.ssh_host, "port": standby.ssh_port,
                           "user": standby.ssh_user, "host_key": standby.ssh_host_key}
    assert body["machine"] is None
    assert manifest(mirror) == expected  # the file written before the last sync is there
    failover = instance.events.filter(kind="standby", data__has_key="failover_seconds").get()
    assert failover.data["detection_seconds"] >= LOST_AFTER
    assert failover.data["work_lost_seconds"] >= 0 and failover.data["recovery_point"]

    # the user keeps working on the standby, then fails back
    (mirror / "written-on-the-standby.txt").write_text("during the failover\n")
    (mirror / "notes.txt").unlink()
    on_standby = manifest(mirror)
    assert api.post(f"/api/v1/instances/{instance.pk}/failback").status_code == 202
    assert api.post(f"/api/v1/instances/{instance.pk}/failback").status_code == 409
    wait_for_status(instance, "running", "failover", timeout=180)
    assert instance.status == "running", instance.status_reason
    assert instance.host_id != lost_host
    assert manifest(workspace_of(stack, instance)) == on_standby
    assert api.get(f"/api/v1/instances/{instance.pk}").json()["ssh"]["on"] == "gpu"

    # mirroring resumes from the new GPU machine, to the same standby
    (workspace_of(stack, instance) / "after-failback.txt").write_text("mirrored again\n")
    synced_after(instance, timezone.now())
    assert (mirror / "after-failback.txt").read_text() == "mirrored again\n"
    assert_no_leak(stack, instance)
    assert len(machine_ids(stack, instance)) == 2  # the GPU machine and its standby

    # hibernating destroys the standby too: the snapshot is enough
    assert api.post(f"/api/v1/instances/{instance.pk}/hibernate").status_code == 202
    wait_for_status(instance, "hibernated", timeout=180)
    wait_until(lambda: machine_ids(stack, instance) == set(), timeout=60, what="the standby to be destroyed")
    # the row follows the provider's destroy (the same task, a moment later)
    wait_until(lambda: not StandbyMachine.objects.filter(instance=instance, status__in=StandbyMachine.ACTIVE).exists(),
               timeout=120, what="the standby row to leave its active statuses")
    destroy(stack, api, instance)


def test_a_failover_drill_loses_nothing_and_destroy_takes_the_standby(stack, api):
    enable_standby(api)
    instance = launch(api, "DRILL")
    gpu_machine = instance.provider_instance_id
    standby = first_sync(instance)
    (workspace_of(stack, instance) / "just-before-the-drill.txt").write_text("the drill's last sync carries me\n")
    assert api.post(f"/api/v1/instances/{instance.pk}/failover").status_code == 202
    wait_for_status(instance, "failover", timeout=60)
    assert (standby_workspace(stack, standby) / "just-before-the-drill.txt").exists()
    drill = instance.events.filter(kind="standby", data__has_key="failover_seconds").get()
    assert drill.data["lost"]["provider_instance_id"] == gpu_machine
    wait_until(lambda: gpu_machine not in machine_ids(stack, instance), timeout=30, what="the GPU machine to go")
    assert not MachineAttempt.objects.filter(instance=instance, outcome="machine_lost").exists()  # not the host's fault
    assert api.post(f"/api/v1/instances/{instance.pk}/failover").status_code == 409
    destroy(stack, api, instance)
    assert StandbyMachine.objects.get(pk=standby.pk).status == "destroyed"


def test_a_standby_that_cannot_be_provisioned_is_an_event_and_the_gpu_keeps_running(stack, api):
    enable_standby(api)
    stack.market.control.set_host("cpu-standby", capacity=0)
    try:
        instance = launch(api, "STBY-FAIL")
        failed = wait_until(lambda: instance.events.filter(kind="standby", data__failed=True).first(), timeout=60,
                            what="the standby failure event")
        assert "could not be provisioned" in failed.message
        wait_until(lambda: heartbeats_arrive(instance), timeout=60, what="the agent's heartbeats")
        started = timezone.now()
        wait_until(lambda: agent_selectors.last_heartbeat_at(instance.pk) > started, timeout=30,
                   what="heartbeats after the failure")
        instance.refresh_from_db()
        assert instance.status == "running"
        assert StandbyMachine.objects.filter(instance=instance).values_list("status", flat=True).get() == "failed"
        assert api.post(f"/api/v1/instances/{instance.pk}/failover").status_code == 409
        assert StandbyMachine.objects.filter(instance=instance).count() == 1  # the retry waits STANDBY_RETRY_SECONDS
        assert_no_leak(stack, instance)
    finally:
        stack.market.control.set_host("cpu-standby", capacity=4)
    destroy(stack, api, instance)
