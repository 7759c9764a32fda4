"""The launch race end to end: API -> real Celery worker -> local marketplace -> real SSH."""

import pytest
from django.conf import settings

from instances.models import Instance, InstanceEvent
from machines import reliability
from machines.models import MachineAttempt
from machines.ssh import SSHTarget, connect
from tests.harness import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
STACK_SETTINGS = {
    "RACE_BATCH_TIMEOUT_SECONDS": 6.0,
    "RACE_MACHINE_TIMEOUT_SECONDS": 60.0,
    "RACE_POLL_INTERVAL_SECONDS": 0.3,
    "RACE_SSH_TIMEOUT_SECONDS": 8.0,
}


def launch(api, gpu_name: str, name: str | None = None) -> Instance:
    response = api.post("/api/v1/instances", {"name": name or gpu_name.lower(), "gpu_name": gpu_name}, format="json")
    assert response.status_code == 202, response.json()
    assert response.json()["status"] == "pending"
    return Instance.objects.get(pk=response.json()["id"])


def wait_for_status(instance: Instance, *statuses: str, timeout: float = 90) -> Instance:
    def settled():
        instance.refresh_from_db()
        return instance.status in statuses

    wait_until(settled, timeout=timeout, what=f"instance {instance.pk} to be {'/'.join(statuses)}")
    return instance


def wait_settled(instance: Instance) -> None:
    """The winner is committed first, the losers are destroyed right after: wait for those too."""
    wait_until(lambda: not MachineAttempt.objects.filter(instance=instance, outcome__in=("pending", "booting"))
               .exists(), timeout=60, what="the race to settle its losers")


def test_a_fast_host_among_slow_ones_wins_and_every_loser_is_destroyed(stack, api):
    instance = wait_for_status(launch(api, "RACE-FAST"), "running", "failed")
    assert instance.status == "running", instance.status_reason
    wait_settled(instance)
    attempts = {a.host_id: a for a in MachineAttempt.objects.filter(instance=instance)}
    assert len(attempts) == 5 and {a.round for a in attempts.values()} == {1}
    assert attempts["501"].outcome == "won" and attempts["501"].seconds_to_ready > 0
    assert instance.host_id == "501" and instance.provider_instance_id == attempts["501"].provider_instance_id
    losers = [a for host, a in attempts.items() if host != "501"]
    assert all(a.outcome == "lost" and a.destroyed_at for a in losers)
    assert [m["id"] for m in stack.machines(f"{instance.label}-")] == [int(instance.provider_instance_id)]

    # the winner answers SSH with the pinned host key, in its own workspace
    target = SSHTarget(instance.ssh_host, instance.ssh_port, instance.ssh_user, instance.ssh_host_key)
    with connect(target, settings.DUMONT_SSH_KEY_PATH) as session:
        result = session.run('cd "$DUMONT_WORKSPACE" && pwd')
    assert result.ok and result.stdout.strip().endswith("workspace")

    events = api.get(f"/api/v1/instances/{instance.pk}/events").json()
    messages = [e["message"] for e in events]
    assert any("round 1: renting 5 machines" in m for m in messages)
    assert any(m.startswith("race won by 501") for m in messages)
    newer = api.get(f"/api/v1/instances/{instance.pk}/events?after={events[-2]['id']}").json()
    assert [e["id"] for e in newer] == [events[-1]["id"]]

    assert api.delete(f"/api/v1/instances/{instance.pk}").status_code == 202
    wait_for_status(instance, "destroyed")
    assert stack.machines(f"{instance.label}-") == []
    assert api.delete(f"/api/v1/instances/{instance.pk}").status_code == 409


def test_hanging_rounds_move_on_and_never_rent_more_than_15_machines(stack, api):
    instance = wait_for_status(launch(api, "RACE-HANG"), "failed", timeout=120)
    attempts = list(MachineAttempt.objects.filter(instance=instance))
    assert len(attempts) == 15
    assert sorted(a.round for a in attempts) == [1] * 5 + [2] * 5 + [3] * 5
    assert len({a.host_id for a in attempts}) == 15 and "615" not in {a.host_id for a in attempts}
    assert all(a.destroyed_at and a.outcome == "boot_timeout" for a in attempts)
    assert "3 rounds" in instance.status_reason
    assert stack.machines(f"{instance.label}-") == []
    rounds = InstanceEvent.objects.filter(instance=instance, message__contains="produced no winner")
    assert rounds.count() == 3


def test_a_host_whose_ssh_never_answers_never_wins(stack, api):
    instance = wait_for_status(launch(api, "RACE-SSH"), "running", "failed")
    assert instance.status == "running" and instance.host_id == "512"
    wait_settled(instance)
    dead = MachineAttempt.objects.get(instance=instance, host_id="511")
    assert dead.outcome in ("ssh_failed", "lost") and dead.ready_at is None and dead.destroyed_at
    assert len(stack.machines(f"{instance.label}-")) == 1
    assert api.delete(f"/api/v1/instances/{instance.pk}").status_code == 202
    wait_for_status(instance, "destroyed")


def test_blacklisted_hosts_are_never_rented(stack, api):
    reliability.blacklist_add(provider="local", host_id="521", reason="test", hours=1)
    instance = wait_for_status(launch(api, "RACE-BL"), "running", "failed")
    assert instance.status == "running"
    assert set(MachineAttempt.objects.filter(instance=instance).values_list("host_id", flat=True)) == {"522"}
    assert api.delete(f"/api/v1/instances/{instance.pk}").status_code == 202
    wait_for_status(instance, "destroyed")


def test_pause_resume_destroy_round_trip(stack, api, other_api):
    instance = wait_for_status(launch(api, "RACE-LIFE"), "running", "failed")
    assert instance.status == "running", instance.status_reason
    machine_id = int(instance.provider_instance_id)
    assert api.post(f"/api/v1/instances/{instance.pk}/resume").status_code == 409
    assert other_api.post(f"/api/v1/instances/{instance.pk}/pause").status_code == 404

    assert api.post(f"/api/v1/instances/{instance.pk}/pause").status_code == 202
    wait_for_status(instance, "paused")
    assert stack.market.control.instance(machine_id)["status"] == "stopped"
    conflict = api.post(f"/api/v1/instances/{instance.pk}/pause")
    assert conflict.status_code == 409 and conflict.json()["status"] == "paused"

    assert api.post(f"/api/v1/instances/{instance.pk}/resume").status_code == 202
    wait_for_status(instance, "running")
    target = SSHTarget(instance.ssh_host, instance.ssh_port, instance.ssh_user, instance.ssh_host_key)
    with connect(target, settings.DUMONT_SSH_KEY_PATH) as session:
        assert session.run(["true"]).ok

    assert api.delete(f"/api/v1/instances/{instance.pk}").status_code == 202
    wait_for_status(instance, "destroyed")
    assert stack.machines(f"{instance.label}-") == []
    assert Instance.objects.get(pk=instance.pk).provider_instance_id == ""
