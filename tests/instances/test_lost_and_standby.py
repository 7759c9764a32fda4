"""Lost-machine detection rules, the standby API and its guards, reconcile of standby machines, standby spend.
(End to end, with real machines: tests/e2e/test_lost_machines.py.)"""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.utils import timezone

from agent.models import Heartbeat
from instances import lost, metrics, selectors, standby
from instances.models import Instance, StandbyConfig, StandbyMachine
from instances.reconcile import machine_is_owned
from instances.states import Status, transition
from machines.providers.base import ProviderInstance
from tests.factories import make_instance

pytestmark = pytest.mark.django_db


def _running(user, *, started_ago: float = 600, **fields) -> Instance:
    instance = make_instance(user, status="running", provider_instance_id="77", host_id="h1", ssh_host="127.0.0.1",
                             ssh_port=2222, ssh_host_key="ssh-ed25519 AAAA", **fields)
    Instance.objects.filter(pk=instance.pk).update(status_changed_at=timezone.now() - timedelta(seconds=started_ago))
    return instance


def _heartbeat(instance: Instance, seconds_ago: float) -> None:
    Heartbeat.objects.create(instance=instance, gpu_util=50, nonce=f"n-{instance.pk}-{seconds_ago}",
                             received_at=timezone.now() - timedelta(seconds=seconds_ago))


def test_only_instances_silent_past_the_threshold_are_checked(user, settings):
    settings.LOST_MACHINE_SECONDS = 60
    late = _running(user)
    _heartbeat(late, 45)  # late, under the threshold: nothing
    silent = _running(user)
    _heartbeat(silent, 61)
    never = _running(user)  # no heartbeat ever, long after its start
    fresh = _running(user, started_ago=30)  # just started: its agent has had no time yet
    paused = _running(user)
    Instance.objects.filter(pk=paused.pk).update(status="paused")  # a stopped machine sends nothing, rightly
    assert sorted(selectors.instances_silent()) == sorted([silent.pk, never.pk])
    settings.LOST_MACHINE_SECONDS = 40
    assert late.pk in selectors.instances_silent()
    assert fresh.pk not in selectors.instances_silent()


def test_a_check_that_sees_a_heartbeat_again_does_nothing(user, settings):
    settings.LOST_MACHINE_SECONDS = 60
    instance = _running(user)
    _heartbeat(instance, 5)  # arrived between the sweep and the check
    assert lost.machine_check_run(instance.pk) == "alive"
    instance.refresh_from_db()
    assert instance.status == "running" and not instance.events.filter(kind="lost").exists()


def test_the_recovery_point_is_the_snapshot_start_and_the_work_after_it_is_reported(user):
    from snapshots.models import Snapshot

    instance = _running(user)
    finished = timezone.now() - timedelta(minutes=10)
    snapshot = Snapshot.objects.create(owner=user, instance=instance, status="verified", restic_snapshot_id="ab" * 32,
                                       finished_at=finished, duration_seconds=30)
    lost_at = finished + timedelta(minutes=4)
    event = instance.events.create(kind="lost", message="lost", data={"lost": True,
                                                                      "last_heartbeat_at": lost_at.isoformat()})
    point = lost.recovery_point(snapshot, event)
    assert point["data"]["recovery_point"] == (finished - timedelta(seconds=30)).isoformat()
    assert point["data"]["work_lost_seconds"] == 270.0  # 4 min after the snapshot ended + its 30 s
    assert lost.recovery_point(None, event)["data"]["recovery_point"] is None


@pytest.mark.parametrize(("status", "target"), [
    (Status.RUNNING, Status.RECOVERING), (Status.RUNNING, Status.FAILOVER), (Status.RECOVERING, Status.HIBERNATED),
    (Status.FAILOVER, Status.FAILBACK), (Status.FAILBACK, Status.FAILOVER), (Status.FAILBACK, Status.RUNNING),
])
def test_the_recovery_and_failover_moves_exist(user, status, target):
    instance = make_instance(user, status=status)
    assert transition(instance.pk, target).status == target


@pytest.mark.parametrize(("status", "target"), [
    (Status.PAUSED, Status.RECOVERING), (Status.HIBERNATED, Status.FAILOVER), (Status.FAILOVER, Status.RUNNING),
    (Status.RECOVERING, Status.FAILOVER),
])
def test_moves_that_would_skip_a_step_are_refused(user, status, target):
    from instances.states import IllegalTransition

    instance = make_instance(user, status=status)
    with pytest.raises(IllegalTransition):
        transition(instance.pk, target)


# ---- API ---------------------------------------------------------------------------------------


def _standby(instance: Instance, **fields) -> StandbyMachine:
    fields = {"status": "ready", "price_per_hour": Decimal("0.03"), **fields}
    return StandbyMachine.objects.create(
        instance=instance, provider="local", provider_instance_id="500", label=f"{instance.label}-s1",
        ssh_host="10.0.0.5", ssh_port=22, ssh_host_key="ssh-ed25519 BBBB",
        mirror_private_key="-----BEGIN OPENSSH PRIVATE KEY-----\nsecret\n", mirror_public_key="ssh-ed25519 CCCC",
        **fields)


def test_standby_status_lists_each_live_instance_with_its_standby_and_lag(api, user, other_user):
    StandbyConfig.objects.create(owner=user, enabled=True, provider="local")
    mine = _running(user)
    _standby(mine, last_sync_at=timezone.now() - timedelta(seconds=42))
    without = _running(user)
    make_instance(user, status="destroyed")
    theirs = _running(other_user)
    _standby(theirs)
    body = api.get("/api/v1/standby/status").json()
    assert body["enabled"] is True
    rows = {r["instance"]: r for r in body["instances"]}
    assert set(rows) == {mine.pk, without.pk}
    assert rows[without.pk]["standby"] is None and rows[without.pk]["lag_seconds"] is None
    assert 42 <= rows[mine.pk]["lag_seconds"] < 60
    assert rows[mine.pk]["standby"]["ssh_host"] == "10.0.0.5"
    assert "secret" not in str(body) and "mirror" not in str(body)
    with connection.cursor() as cursor:  # encrypted at rest
        cursor.execute(f"SELECT mirror_private_key FROM {StandbyMachine._meta.db_table}")  # noqa: S608
        assert all("secret" not in raw for (raw,) in cursor.fetchall())


def test_the_ssh_endpoint_is_the_standby_during_a_failover(api, user):
    instance = _running(user)
    assert api.get(f"/api/v1/instances/{instance.pk}").json()["ssh"]["on"] == "gpu"
    _standby(instance, last_sync_at=timezone.now())
    transition(instance.pk, Status.FAILOVER, provider_instance_id="", ssh_host="", ssh_port=None)
    body = api.get(f"/api/v1/instances/{instance.pk}").json()
    assert body["ssh"] == {"on": "standby", "host": "10.0.0.5", "port": 22, "user": "root",
                           "host_key": "ssh-ed25519 BBBB"}
    assert api.get("/api/v1/instances").json()["results"][0]["ssh"]["on"] == "standby"


def test_failover_and_failback_are_guarded(api, other_api, user):
    instance = _running(user)
    assert other_api.post(f"/api/v1/instances/{instance.pk}/failover").status_code == 404
    no_standby = api.post(f"/api/v1/instances/{instance.pk}/failover")
    assert no_standby.status_code == 409 and no_standby.json()["error"] == "no_standby"
    _standby(instance)  # ready but never synced: nothing to fail over to yet
    assert api.post(f"/api/v1/instances/{instance.pk}/failover").status_code == 409
    not_failed_over = api.post(f"/api/v1/instances/{instance.pk}/failback")
    assert not_failed_over.status_code == 409 and not_failed_over.json()["error"] == "invalid_state"
    assert other_api.post(f"/api/v1/instances/{instance.pk}/failback").status_code == 404
    instance.refresh_from_db()
    assert instance.status == "running"


def test_the_standby_config_accepts_a_short_interval_and_refuses_nonsense(api):
    assert api.put("/api/v1/standby", {"sync_interval_seconds": 10}, format="json").status_code == 200
    bad = api.put("/api/v1/standby", {"sync_interval_seconds": 5}, format="json")
    assert bad.status_code == 400 and "sync_interval_seconds" in bad.json()["fields"]


# ---- reconcile and spend ---------------------------------------------------------------------------


def _machine(label: str, machine_id: str = "500") -> ProviderInstance:
    return ProviderInstance(provider="local", instance_id=machine_id, status="running", raw_status="running",
                            label=label)


def test_a_standby_machine_is_owned_only_while_its_instance_keeps_one(user):
    instance = _running(user)
    row = _standby(instance)
    label = f"{instance.label}-s{row.pk}"
    assert machine_is_owned(_machine(label), "local")
    assert not machine_is_owned(_machine(label, machine_id="999"), "local")  # not the machine we rented
    assert not machine_is_owned(_machine(f"{instance.label}-s{row.pk + 1}"), "local")  # no such standby
    Instance.objects.filter(pk=instance.pk).update(status="hibernated")
    assert not machine_is_owned(_machine(label), "local")  # a hibernated instance keeps no standby
    Instance.objects.filter(pk=instance.pk).update(status="failover")
    assert machine_is_owned(_machine(label), "local")
    StandbyMachine.objects.filter(pk=row.pk).update(status="destroyed")
    assert not machine_is_owned(_machine(label), "local")


def test_standby_spend_counts_each_standby_while_it_was_rented(user):
    instance = _running(user)
    now = timezone.now()
    row = _standby(instance, price_per_hour=Decimal("0.04"))
    StandbyMachine.objects.filter(pk=row.pk).update(created_at=now - timedelta(hours=10),
                                                    destroyed_at=now - timedelta(hours=4))
    assert selectors.standby_spend([instance], since=now - timedelta(days=1), until=now) == Decimal("0.24")
    # a window that cuts the period counts only its part
    assert selectors.standby_spend([instance], since=now - timedelta(hours=5), until=now) == Decimal("0.04")
    report = metrics.fleet_metrics(user=user, days=1, now=now)
    assert Decimal(report["spend"]["standby"]) == Decimal("0.240000")
    assert report["spend"]["total"] >= report["spend"]["standby"]


def test_the_standby_sweep_provisions_syncs_destroys_and_retries_what_it_should(user, other_user, settings,
                                                                               monkeypatch):
    from instances import tasks

    settings.STANDBY_RETRY_SECONDS = 300
    sent: dict[str, list[int]] = {}
    for name in ("provision_standby", "sync_standby", "destroy_standby", "failback_instance"):
        monkeypatch.setattr(getattr(tasks, name), "delay", lambda i, name=name: sent.setdefault(name, []).append(i))
    StandbyConfig.objects.create(owner=user, enabled=True, provider="local", sync_interval_seconds=60)
    StandbyConfig.objects.create(owner=other_user, enabled=False, provider="local", auto_recovery=True)
    now = timezone.now()

    bare = _running(user)
    failed_lately = _running(user)
    _standby(failed_lately, status="failed")
    failed_long_ago = _running(user)
    StandbyMachine.objects.filter(pk=_standby(failed_long_ago, status="failed").pk).update(
        created_at=now - timedelta(minutes=10))
    due = _running(user)
    _standby(due, last_sync_at=now - timedelta(seconds=61))
    fresh = _running(user)
    _standby(fresh, last_sync_at=now - timedelta(seconds=30))
    hibernated = make_instance(user, status="hibernated")
    _standby(hibernated)
    disabled = _running(other_user)
    _standby(disabled, last_sync_at=now)
    on_standby = make_instance(other_user, status="failover")  # disabled meanwhile: the user works there
    _standby(on_standby, last_sync_at=now)
    Instance.objects.filter(pk=on_standby.pk).update(status_changed_at=now - timedelta(minutes=6))

    result = tasks.standby_sweep()
    assert sorted(result["provisioning"]) == sorted([bare.pk, failed_long_ago.pk])
    assert result["syncing"] == [due.pk]
    assert sorted(result["destroying"]) == sorted([hibernated.pk, disabled.pk])
    assert result["failing_back"] == [on_standby.pk]
    assert {name: sorted(ids) for name, ids in sent.items()} == {
        "provision_standby": sorted([bare.pk, failed_long_ago.pk]), "sync_standby": [due.pk],
        "destroy_standby": sorted([hibernated.pk, disabled.pk]), "failback_instance": [on_standby.pk]}


def test_a_gcp_standby_refused_for_quota_is_an_event_and_the_gpu_instance_is_untouched(user, settings):
    """The standby path end to end through the GCP adapter, against the recorded Compute API responses."""
    from machines.models import ProviderAccount
    from tests.machines.test_gcp_adapter import ZONE, Stub, fixture, service_account_key

    stub = Stub()
    try:
        settings.GCP_COMPUTE_API_URL = stub.compute_url
        stub.reply("POST", f"zones/{ZONE}/instances", (403, fixture("error_quota_exceeded.json")))
        ProviderAccount.objects.create(owner=user, provider="gcp", name="standby",
                                       api_key=service_account_key(f"{stub.root}/token"))
        StandbyConfig.objects.create(owner=user, enabled=True, provider="gcp", zone=ZONE,
                                     machine_type="e2-standard-2")
        instance = _running(user)

        assert standby.standby_provision_run(instance.pk) == "failed"
        row = StandbyMachine.objects.get(instance=instance)
        assert row.status == "failed" and "quota" in row.error.lower() and row.provider_account is not None
        event = instance.events.get(kind="standby", data__failed=True)
        assert "could not be provisioned" in event.message
        instance.refresh_from_db()
        assert instance.status == "running" and instance.provider_instance_id == "77"
        insert = stub.calls("POST", f"zones/{ZONE}/instances")[0]
        assert insert.json["machineType"].endswith("/e2-standard-2")
        stored_label = {m["key"]: m["value"] for m in insert.json["metadata"]["items"]}["dumont-label"]
        assert stored_label == row.label == f"{instance.label}-s{row.pk}"  # what reconcile finds it by
    finally:
        stub.close()


def test_a_failback_whose_standby_is_gone_recovers_from_the_snapshot_instead(user):
    instance = make_instance(user, status="failback")
    StandbyMachine.objects.create(instance=instance, provider="local", status="failed", error="lost")
    assert standby.instance_failback_run(instance.pk) == "recovering"
    instance.refresh_from_db()
    assert instance.status == "recovering"
    assert standby.instance_failback_run(instance.pk) == "skipped"  # once
