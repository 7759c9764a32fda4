"""A machine that may still hold work is never destroyed, and the newest copy of a workspace wins
(issue #13), end to end: real worker, beat, web server (heartbeats), marketplace, SSH, rsync, restic, S3.

The marketplace's faults: a partition (the machine runs on, but its SSH port never answers and its agent's
heartbeats stop), a provider-side stop that keeps the disk, a partition of every machine at once (our own
network down). Every test ends with the marketplace holding exactly what the database owns."""

from datetime import timedelta

import pytest
from django.utils import timezone

from agent import selectors as agent_selectors
from instances import lifecycle, lost, selectors
from instances.models import Instance, OperatorAlert, StandbyMachine, UnreachableMachine
from instances.reconcile import reconcile_machines
from machines.clients import provider_client
from machines.models import MachineAttempt, MachineStats
from machines.providers.base import LaunchRequest
from snapshots import services as snapshot_services
from snapshots.models import Snapshot, SnapshotRepository
from tests.e2e.conftest import CATALOGUES
from tests.e2e.test_hibernation import heartbeats_arrive, launch, workspace_of
from tests.e2e.test_lost_machines import (
    assert_no_leak,
    destroy,
    enable_standby,
    first_sync,
    machine_ids,
    standby_workspace,
    synced_after,
    take_snapshot,
)
from tests.e2e.test_race import wait_for_status
from tests.harness import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
STACK_CATALOGUE = CATALOGUES / "unreachable.yaml"
STACK_SERVICES = {"s3", "web", "beat"}
LOST_AFTER = 8.0
STACK_SETTINGS = {
    "RACE_BATCH_TIMEOUT_SECONDS": 20.0,
    "RACE_POLL_INTERVAL_SECONDS": 0.3,
    "AGENT_HEARTBEAT_INTERVAL_SECONDS": 1,
    "AGENT_FLUSH_INTERVAL_SECONDS": 1,
    "IDLE_WINDOW_SECONDS": 3600.0,  # these machines idle at 0% GPU: no hibernation here
    "LOST_MACHINE_SECONDS": LOST_AFTER,
    "LOST_SWEEP_SECONDS": 2.0,
    "LOST_SSH_TIMEOUT_SECONDS": 3.0,
    "LOST_FLEET_SILENT_MIN": 2,  # two machines partitioned at once are "the fleet" here
    "UNREACHABLE_GRACE_SECONDS": 15.0,
    "STANDBY_SWEEP_SECONDS": 2.0,
    "STANDBY_RETRY_SECONDS": 600.0,
    "RECONCILE_STALE_SECONDS": 0,
    "RECONCILE_INTERVAL_SECONDS": 5,
}


def _restic_paths(snapshot: Snapshot) -> set[str]:
    """The file names the control plane's restic lists in a snapshot."""
    repository = snapshot_services._control_plane_repository(SnapshotRepository.objects.get(owner=snapshot.owner))
    result = snapshot_services._local_runner()(
        [*snapshot_services.tuning().global_args(repository), "ls", snapshot.restic_snapshot_id],
        env=repository.env())
    assert result.ok, result.stderr
    return {line.rsplit("/", 1)[-1] for line in result.stdout.splitlines()}


def _heartbeats_after(instance: Instance, moment) -> None:
    wait_until(lambda: (agent_selectors.last_heartbeat_at(instance.pk) or moment) > moment, timeout=60,
               what="heartbeats again")


# ---- 1. lost is not unreachable ----------------------------------------------------------------


def test_a_partitioned_machine_is_kept_flagged_and_saved_first_when_it_answers_again(stack, api):
    instance = launch(api, "PART")
    machine, host = instance.provider_instance_id, instance.host_id
    wait_until(lambda: heartbeats_arrive(instance), timeout=60, what="the agent's heartbeats")
    workspace = workspace_of(stack, instance)
    stack.market.control.partition(machine)
    try:
        wait_for_status(instance, "unreachable", timeout=60)
        (workspace / "written-during-the-partition.txt").write_text("the machine runs on: unsaved work\n")
        alert = wait_until(lambda: OperatorAlert.objects.filter(kind="unreachable", instance=instance,
                                                                resolved_at__isnull=True).first(),
                           timeout=90, what="the operator alert after the grace")
        row = UnreachableMachine.objects.get(instance=instance)
        assert row.state == "open" and row.flagged_at and row.checks >= 1  # re-checked every sweep
        assert machine in alert.message
        reconcile_machines()  # reconcile owns the kept machine too
        assert machine in machine_ids(stack, instance)
        instance.refresh_from_db()
        assert instance.status == "unreachable" and instance.provider_instance_id == machine
    finally:
        stack.market.control.partition(machine, on=False)

    wait_for_status(instance, "running", timeout=90)
    assert instance.provider_instance_id == machine
    saved = Snapshot.objects.get(instance=instance, reason="unreachable")
    assert saved.status == "verified"
    assert "written-during-the-partition.txt" in _restic_paths(saved)  # saved before anything else
    row.refresh_from_db()
    assert row.state == "saved"
    assert OperatorAlert.objects.get(pk=alert.pk).resolved_at is not None
    _heartbeats_after(instance, instance.status_changed_at)  # its agent was started again
    # not a lost machine, and not the host's fault as far as anyone else can tell
    assert not MachineAttempt.objects.filter(instance=instance, outcome="machine_lost").exists()
    attempt = MachineAttempt.objects.get(instance=instance, outcome="unreachable")
    assert attempt.host_fault_confirmed is False
    assert MachineStats.objects.filter(provider="local", host_id=host, failures__gt=0).count() == 0
    assert_no_leak(stack, instance)
    destroy(stack, api, instance)


def test_with_a_standby_the_user_fails_over_and_the_partitioned_gpu_is_destroyed_only_once_saved(stack, api):
    enable_standby(api)
    instance = launch(api, "PSTB")
    gpu = instance.provider_instance_id
    first_sync(instance)
    workspace = workspace_of(stack, instance)
    stack.market.control.partition(gpu)
    try:
        wait_for_status(instance, "failover", timeout=60)
        (workspace / "only-on-the-gpu.txt").write_text("written after the last mirror sync\n")
        row = UnreachableMachine.objects.get(instance=instance, state="open")
        assert row.provider_instance_id == gpu
        reconcile_machines()
        assert gpu in machine_ids(stack, instance)  # kept while it may hold work
    finally:
        stack.market.control.partition(gpu, on=False)

    wait_until(lambda: UnreachableMachine.objects.filter(pk=row.pk, state="saved").exists(), timeout=90,
               what="the answering GPU machine to be saved")
    saved = Snapshot.objects.get(instance=instance, reason="unreachable")
    assert saved.status == "verified" and "only-on-the-gpu.txt" in _restic_paths(saved)
    wait_until(lambda: gpu not in machine_ids(stack, instance), timeout=30, what="the saved GPU machine to go")
    instance.refresh_from_db()
    assert instance.status == "failover"  # the user stays on the standby
    assert_no_leak(stack, instance)
    destroy(stack, api, instance)


def test_a_machine_the_provider_stopped_is_started_again_and_saved_not_destroyed(stack, api):
    instance = launch(api, "HSTOP")
    machine = instance.provider_instance_id
    wait_until(lambda: heartbeats_arrive(instance), timeout=60, what="the agent's heartbeats")
    workspace = workspace_of(stack, instance)
    (workspace / "on-the-disk.txt").write_text("the disk is kept\n")
    stack.market.control.host_stop(machine)

    wait_until(lambda: instance.events.filter(kind="lost", data__started=True).exists(), timeout=60,
               what="the stopped machine to be started again")
    wait_until(lambda: UnreachableMachine.objects.filter(instance=instance, state="saved").exists(), timeout=120,
               what="the restarted machine to be saved")
    wait_for_status(instance, "running", timeout=30)
    assert instance.provider_instance_id == machine
    assert (workspace / "on-the-disk.txt").read_text() == "the disk is kept\n"
    saved = Snapshot.objects.get(instance=instance, reason="unreachable")
    assert saved.status == "verified" and "on-the-disk.txt" in _restic_paths(saved)
    _heartbeats_after(instance, instance.status_changed_at)
    assert not instance.events.filter(kind="lost", data__lost=True).exists()
    assert_no_leak(stack, instance)
    destroy(stack, api, instance)


def test_a_control_plane_wide_partition_judges_nobody_and_raises_one_operator_alert(stack, api):
    instances = []
    for name in ("fleet-1", "fleet-2"):
        response = api.post("/api/v1/instances", {"name": name, "gpu_name": "FLEET"}, format="json")
        assert response.status_code == 202, response.json()
        instances.append(Instance.objects.get(pk=response.json()["id"]))
    for instance in instances:
        wait_for_status(instance, "running", timeout=120)
        wait_until(lambda i=instance: heartbeats_arrive(i), timeout=60, what="the agent's heartbeats")
    machines = {i.pk: i.provider_instance_id for i in instances}
    partitioned = stack.market.control.partition_all()
    try:
        assert {int(m) for m in machines.values()} <= set(partitioned)
        alert = wait_until(lambda: OperatorAlert.objects.filter(kind="fleet_silent", resolved_at__isnull=True).first(),
                           timeout=60, what="the fleet-silence alert")
        assert "2 of 2" in alert.message
        # sweeps keep coming while silent: still nobody judged
        wait_until(lambda: set(selectors.instances_silent(seconds=LOST_AFTER * 2)) >= set(machines), timeout=60,
                   what="silence twice past the threshold")
        for instance in instances:
            instance.refresh_from_db()
            assert instance.status == "running" and instance.provider_instance_id == machines[instance.pk]
            assert not instance.events.filter(kind="lost").exists()
    finally:
        stack.market.control.partition_all(on=False)
    healed = timezone.now()
    for instance in instances:
        _heartbeats_after(instance, healed)
    wait_until(lambda: OperatorAlert.objects.get(pk=alert.pk).resolved_at is not None, timeout=30,
               what="the alert to be resolved once they answer")
    assert not UnreachableMachine.objects.filter(instance__in=instances).exists()
    for instance in instances:
        assert_no_leak(stack, instance)
        destroy(stack, api, instance)


# ---- 2. a pause that times out ------------------------------------------------------------------


def test_a_pause_that_times_out_is_pausing_never_judged_and_finishes_later(stack, api, settings):
    instance = launch(api, "PAUSE")
    machine = instance.provider_instance_id
    wait_until(lambda: heartbeats_arrive(instance), timeout=60, what="the agent's heartbeats")
    settings.MACHINE_ACTION_TIMEOUT_SECONDS = 0  # this process's pause gives up before the provider answers
    assert lifecycle.instance_pause_run(instance.pk) == "timeout"
    instance.refresh_from_db()
    assert instance.status in ("pausing", "paused")  # reconcile may have finished it already
    assert instance.events.filter(kind="status", data__to="pausing").exists()
    stopped_at = timezone.now()
    wait_until(lambda: (timezone.now() - max(agent_selectors.last_heartbeat_at(instance.pk), stopped_at))
               .total_seconds() > LOST_AFTER + 2, timeout=60, what="silence past the lost threshold")
    assert instance.pk not in selectors.instances_silent()
    assert lost.machine_check_run(instance.pk) == "skipped"
    wait_for_status(instance, "paused", timeout=60)  # reconcile ran the pause again
    assert machine in machine_ids(stack, instance)  # stopped, its disk kept: never destroyed
    assert not instance.events.filter(kind="lost").exists()
    destroy(stack, api, instance)


# ---- 3. a failover drill whose last sync fails --------------------------------------------------


def test_a_failover_drill_whose_last_sync_fails_aborts_and_keeps_the_gpu(stack, api):
    enable_standby(api, sync_interval_seconds=3600)
    instance = launch(api, "DRILL2")
    gpu = instance.provider_instance_id
    standby = first_sync(instance)
    stack.market.control.partition(standby.provider_instance_id)  # the standby cannot be reached
    try:
        assert api.post(f"/api/v1/instances/{instance.pk}/failover").status_code == 202
        aborted = wait_until(lambda: instance.events.filter(kind="standby", data__drill_aborted=True).first(),
                             timeout=90, what="the drill to abort")
        assert "nothing destroyed" in aborted.message
        instance.refresh_from_db()
        assert instance.status == "running" and instance.provider_instance_id == gpu
        assert gpu in machine_ids(stack, instance)
        assert not instance.events.filter(kind="status", data__to="failover").exists()
    finally:
        stack.market.control.partition(standby.provider_instance_id, on=False)
    assert_no_leak(stack, instance)
    destroy(stack, api, instance)


# ---- 5. a newer mirror beats an older snapshot --------------------------------------------------


def test_recovery_takes_the_standbys_mirror_when_it_is_newer_than_the_snapshot(stack, api):
    enable_standby(api, auto_failover=False)
    instance = launch(api, "MIRR")
    lost_host = instance.host_id
    first_sync(instance)
    workspace = workspace_of(stack, instance)
    wait_until(lambda: heartbeats_arrive(instance), timeout=60, what="the agent's heartbeats")
    take_snapshot(api, instance)
    (workspace / "after-the-snapshot.txt").write_text("only the mirror has me\n")
    standby = synced_after(instance, timezone.now())
    assert (standby_workspace(stack, standby) / "after-the-snapshot.txt").exists()

    stack.market.control.crash(instance.provider_instance_id)
    wait_for_status(instance, "recovering", timeout=60)
    wait_for_status(instance, "running", "hibernated", timeout=180)
    assert instance.status == "running", instance.status_reason
    assert instance.host_id != lost_host
    assert (workspace_of(stack, instance) / "after-the-snapshot.txt").read_text() == "only the mirror has me\n"
    recovery = wait_until(lambda: instance.events.filter(kind="recovery").first(), timeout=60,
                          what="the recovery's event (written once its task is done)")
    assert recovery.data["mirror"] == standby.pk and recovery.data["snapshot"] is None
    # the next sync pushes from the new machine: the mirror keeps the file
    synced_after(instance, timezone.now())
    assert (standby_workspace(stack, standby) / "after-the-snapshot.txt").exists()
    assert_no_leak(stack, instance)
    destroy(stack, api, instance)


# ---- 6. a standby provisioning killed mid-way ---------------------------------------------------


def test_a_standby_stuck_provisioning_is_failed_its_machine_destroyed_and_the_sweep_retries(stack, api):
    instance = launch(api, "STALE")
    # what a worker killed mid-provisioning leaves: the row, and a machine under its label
    stuck = StandbyMachine.objects.create(instance=instance, provider="local", status="provisioning")
    stuck.label = f"{instance.label}-s{stuck.pk}"
    stuck.save(update_fields=["label"])
    client = provider_client("local", None)
    offer = client.standby_offer(zone="", machine_type="", disk_gb=10, spot=True)
    orphan = client.create(offer, LaunchRequest(label=stuck.label, image="debian-12", disk_gb=10,
                                                ssh_public_keys=()))
    StandbyMachine.objects.filter(pk=stuck.pk).update(created_at=timezone.now() - timedelta(seconds=900))
    enable_standby(api)

    wait_until(lambda: StandbyMachine.objects.filter(pk=stuck.pk, status="failed").exists(), timeout=120,
               what="the stuck row to be failed")
    wait_until(lambda: orphan.instance_id not in machine_ids(stack, instance), timeout=30,
               what="its machine, found by label, to be destroyed")
    retried = wait_until(lambda: StandbyMachine.objects.filter(instance=instance, status="ready").first(),
                         timeout=120, what="the sweep to provision a new standby")
    assert retried.pk != stuck.pk
    assert_no_leak(stack, instance)
    destroy(stack, api, instance)
