"""The rules around machines that may still hold work (issue #13) and whose failures count where (issue
#14, item 5). End to end, with real machines and faults: tests/e2e/test_unreachable.py."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from agent.models import Heartbeat
from instances import hibernation, lost, selectors, standby
from instances.models import InstanceEvent, OperatorAlert, StandbyMachine, UnreachableMachine
from instances.reconcile import machine_is_owned
from instances.states import Status, can_transition
from machines import reliability
from machines.models import MachineAttempt, MachineBlacklist, MachineStats
from machines.providers.base import ProviderInstance
from snapshots.models import Snapshot, SnapshotRestore
from tests.factories import make_instance, make_user

pytestmark = pytest.mark.django_db


def _running(user, **fields):
    instance = make_instance(user, status="running", provider_instance_id=fields.pop("machine", "77"), host_id="h1",
                             ssh_host="127.0.0.1", ssh_port=2222, ssh_host_key="ssh-ed25519 AAAA", **fields)
    type(instance).objects.filter(pk=instance.pk).update(status_changed_at=timezone.now() - timedelta(seconds=600))
    return instance


# ---- fleet-wide silence ---------------------------------------------------------------------------


@pytest.mark.parametrize(("silent", "running", "judged"), [
    (2, 2, True),  # fewer than LOST_FLEET_SILENT_MIN: judged one by one
    (3, 15, True),  # exactly 20%: not more than the share
    (3, 14, False), (4, 10, False), (3, 3, False),
])
def test_fleet_silence_needs_more_than_the_share_and_at_least_the_minimum(settings, silent, running, judged):
    settings.LOST_FLEET_SILENT_SHARE, settings.LOST_FLEET_SILENT_MIN = 0.2, 3
    assert lost.fleet_silent(silent, running) is not judged


def test_a_sweep_that_finds_the_fleet_silent_judges_nobody_and_raises_one_alert(user, settings):
    settings.LOST_MACHINE_SECONDS = 60
    instances = [_running(user, machine=str(n)) for n in range(3)]
    assert lost.lost_machine_sweep()["checking"] == []
    assert lost.lost_machine_sweep()["checking"] == []  # a second sweep: still one open alert
    alert = OperatorAlert.objects.get(kind="fleet_silent", resolved_at__isnull=True)
    assert "3 of 3" in alert.message
    for instance in instances[1:]:  # they answer again: the alert closes, the last silent one is judged
        Heartbeat.objects.create(instance=instance, gpu_util=50, nonce=f"n{instance.pk}", received_at=timezone.now())
    assert lost.lost_machine_sweep()["checking"] == [instances[0].pk]
    assert OperatorAlert.objects.get(pk=alert.pk).resolved_at is not None


# ---- states -------------------------------------------------------------------------------------------


def test_pausing_and_unreachable_are_states_the_lost_sweep_never_judges(user, settings):
    settings.LOST_MACHINE_SECONDS = 60
    pausing = _running(user, machine="1")
    unreachable = _running(user, machine="2")
    type(pausing).objects.filter(pk=pausing.pk).update(status=Status.PAUSING)
    type(unreachable).objects.filter(pk=unreachable.pk).update(status=Status.UNREACHABLE)
    assert selectors.instances_silent() == []
    assert lost.machine_check_run(pausing.pk) == "skipped"
    assert can_transition(Status.RUNNING, Status.PAUSING) and can_transition(Status.PAUSING, Status.PAUSED)
    assert can_transition(Status.UNREACHABLE, Status.RUNNING) and not can_transition(Status.UNREACHABLE,
                                                                                     Status.HIBERNATED)


def test_reconcile_owns_a_machine_kept_as_unreachable_until_it_is_resolved(user):
    instance = _running(user)
    machine = ProviderInstance(provider="local", instance_id="555", status="running", raw_status="running",
                               label="nobody-knows")
    row = UnreachableMachine.objects.create(instance=instance, provider="local", provider_instance_id="555")
    assert machine_is_owned(machine, "local")
    UnreachableMachine.objects.filter(pk=row.pk).update(state="saved")
    assert not machine_is_owned(machine, "local")


# ---- item 5: mirroring never overwrites a newer mirror -----------------------------------------------


def test_a_sync_from_a_machine_restored_from_an_older_snapshot_never_overwrites_a_newer_mirror(user):
    instance = _running(user, machine="new-gpu", machine_started_at=timezone.now() - timedelta(minutes=5))
    now = timezone.now()
    mirror = StandbyMachine.objects.create(instance=instance, provider="local", status="ready",
                                           last_sync_at=now - timedelta(minutes=10), synced_from="old-gpu")
    old = Snapshot.objects.create(owner=user, instance=instance, status="verified", restic_snapshot_id="ab" * 32,
                                  captured_at=now - timedelta(minutes=30), finished_at=now - timedelta(minutes=29))
    SnapshotRestore.objects.create(owner=user, snapshot=old, instance=instance, restic_snapshot_id="ab" * 32,
                                   status="succeeded", finished_at=now - timedelta(minutes=4))
    assert standby.mirror_is_newer(instance, mirror)
    assert standby.standby_sync_run(instance.pk) == "refused"  # refused before any SSH
    assert "refused" in StandbyMachine.objects.get(pk=mirror.pk).last_sync_error
    assert instance.events.filter(kind="standby", data__sync_refused=True).count() == 1
    # the same machine that last synced: its own, newer, workspace
    StandbyMachine.objects.filter(pk=mirror.pk).update(synced_from="new-gpu")
    mirror.refresh_from_db()
    assert not standby.mirror_is_newer(instance, mirror)
    # restored from a snapshot newer than the mirror: it may push
    StandbyMachine.objects.filter(pk=mirror.pk).update(synced_from="old-gpu",
                                                       last_sync_at=now - timedelta(minutes=40))
    mirror.refresh_from_db()
    assert not standby.mirror_is_newer(instance, mirror)


# ---- item 7: a hibernation that keeps failing ---------------------------------------------------------


def test_a_hibernation_that_keeps_failing_is_an_operator_alert_and_a_reason_with_its_cost(user, settings):
    settings.HIBERNATE_ALERT_AFTER_FAILURES = 3
    instance = _running(user, price_per_hour=Decimal("2.0000"))
    snapshot = Snapshot(error="restic: connection refused")
    for _ in range(2):
        InstanceEvent.objects.create(instance=instance, kind="hibernate", message="aborted", data={"failed": True})
        assert "the snapshot failed" in hibernation.hibernation_failure_reason(instance, snapshot)
    assert not OperatorAlert.objects.exists()
    first = instance.events.filter(data__failed=True).order_by("id").first()
    InstanceEvent.objects.filter(pk=first.pk).update(created_at=timezone.now() - timedelta(hours=1))
    InstanceEvent.objects.create(instance=instance, kind="hibernate", message="aborted", data={"failed": True})
    reason = hibernation.hibernation_failure_reason(instance, snapshot)
    assert "keeps failing (3 times in a row" in reason and "$2.0000/h" in reason and "$2.00 since" in reason
    alert = OperatorAlert.objects.get(kind="hibernation_failing", instance=instance)
    assert alert.data["failures"] == 3 and alert.data["cost_usd"] == pytest.approx(2.0, abs=0.01)


# ---- #14 item 5: a tenant cannot blacklist hosts for everyone -----------------------------------------


def _failure(instance, *, confirmed: bool) -> None:
    MachineAttempt.objects.create(provider="local", host_id="h1", offer_id="", instance=instance, round=0,
                                  outcome="unreachable" if not confirmed else "machine_lost",
                                  host_fault_confirmed=confirmed, finished_at=timezone.now())


def test_failures_the_provider_did_not_confirm_blacklist_a_host_only_for_their_owner(user, settings):
    settings.RELIABILITY_MAX_CONSECUTIVE_FAILURES = 3
    other = make_user()
    instance = _running(user)
    for _ in range(3):  # a tenant kills sshd and the agent on their own machine, three times
        _failure(instance, confirmed=False)
        reliability.host_stats_update(provider="local", host_id="h1")
        reliability.owner_failures_update(provider="local", host_id="h1", owner_id=user.pk)
    assert "h1" in reliability.blacklisted_hosts("local", owner=user)
    assert "h1" not in reliability.blacklisted_hosts("local", owner=other)
    assert "h1" not in reliability.blacklisted_hosts("local")
    assert MachineStats.objects.get(provider="local", host_id="h1").failures == 0
    assert MachineBlacklist.objects.get(host_id="h1").owner_id == user.pk
    # the provider's own word that the host failed counts for everyone
    for _ in range(3):
        _failure(instance, confirmed=True)
    reliability.host_stats_update(provider="local", host_id="h1")
    assert "h1" in reliability.blacklisted_hosts("local", owner=other)


def test_an_unreachable_verdict_records_an_unconfirmed_failure_and_a_lost_one_only_when_the_provider_says_failed(
        user, settings, monkeypatch):
    settings.RELIABILITY_MAX_CONSECUTIVE_FAILURES = 1
    instance = _running(user)
    monkeypatch.setattr("instances.lost.transition", lambda *a, **k: None)
    lost.machine_unreachable(instance, reason="SSH does not answer", evidence={}, last_heartbeat=None,
                             detected_at=timezone.now(), stopped=False)
    attempt = MachineAttempt.objects.get(instance=instance)
    assert attempt.outcome == "unreachable" and attempt.host_fault_confirmed is False
    assert UnreachableMachine.objects.get(instance=instance).state == "open"
    assert reliability.blacklisted_hosts("local") == set()
    assert reliability.blacklisted_hosts("local", owner=user) == {"h1"}


# ---- item 4: a periodic sync is recorded only under the instance's lock, while it runs ---------------


def test_agent_syncs_are_recorded_only_under_the_lifecycle_lock_of_a_running_instance(user, monkeypatch):
    import threading

    from django.db import connection

    from dumont.core.locks import advisory_lock
    from instances.agent_setup import agent_syncs_record
    from instances.locks import LOCK_NAMESPACE

    instance = _running(user)
    report = {"snapshot_id": "abcd1234", "exit_code": 0}
    monkeypatch.setattr("agent.selectors.latest_heartbeat", lambda pk: {"sync": {"last": report}})
    recorded = []
    monkeypatch.setattr("snapshots.services.snapshot_record_periodic", lambda **kw: recorded.append(kw))
    held, release = threading.Event(), threading.Event()

    def hibernation_in_progress():  # another worker holds the instance (a hibernation, a recovery...)
        try:
            with advisory_lock(LOCK_NAMESPACE, instance.pk) as acquired:
                assert acquired
                held.set()
                release.wait(30)
        finally:
            connection.close()

    worker = threading.Thread(target=hibernation_in_progress)
    worker.start()
    try:
        assert held.wait(30)
        agent_syncs_record()
        assert recorded == []  # the next round records it
    finally:
        release.set()
        worker.join(30)
    agent_syncs_record()
    assert [r["instance_id"] for r in recorded] == [instance.pk]
