"""A marketplace that cannot boot any machine (here: no sshd on its machine) fails the launch at the first
failure, with the reason and the fix in the instance's status_reason and events, instead of burning three
rounds of machines on the same cause; and the hosts are not blamed for it."""

import pytest

from instances.models import Instance
from machines.models import MachineAttempt, MachineStats
from tests.e2e.test_race import STACK_SETTINGS as RACE_SETTINGS
from tests.e2e.test_race import launch, wait_for_status, wait_settled

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
STACK_SETTINGS = RACE_SETTINGS
STACK_MARKET_ENV = {"DUMONT_SSHD_BINARY": "/nonexistent/sbin/sshd"}


def test_a_machine_that_cannot_boot_on_our_side_stops_the_race_with_an_actionable_reason(stack, api):
    instance: Instance = wait_for_status(launch(api, "RACE-FAST"), "running", "failed")
    assert instance.status == "failed"
    assert "sshd" in instance.status_reason
    assert "sudo apt-get install -y openssh-server" in instance.status_reason
    wait_settled(instance)

    attempts = list(MachineAttempt.objects.filter(instance=instance))
    assert {a.round for a in attempts} == {1}, "no second round on the same cause"
    assert all(a.outcome == "abandoned" and a.destroyed_at for a in attempts)
    # the host whose boot revealed it is not blamed: nothing judged against any host
    assert not MachineStats.objects.filter(host_id__in=[a.host_id for a in attempts], failures__gt=0).exists()
    assert stack.machines(f"{instance.label}-") == []

    messages = [e["message"] for e in api.get(f"/api/v1/instances/{instance.pk}/events").json()]
    assert any("501:" in m and "openssh-server" in m for m in messages)
    assert not any("round 2" in m for m in messages)
