"""Loops over many tenants' instances and machines: one's error is logged and skipped, the rest proceed."""

from datetime import timedelta

import pytest
from django.utils import timezone

from agent.models import Heartbeat
from instances import reconcile, selectors
from machines.providers.base import ProviderInstance
from tests.factories import make_instance


class _Market:
    """A provider's list and destroy (we cannot reach a real one here)."""

    def __init__(self, machines):
        self.machines, self.destroyed = machines, []

    def list(self, label_prefix):
        return self.machines

    def destroy(self, machine_id):
        self.destroyed.append(machine_id)


def _orphan(machine_id: str, label: str) -> ProviderInstance:
    return ProviderInstance(provider="vastai", instance_id=machine_id, status="running", raw_status="running",
                            label=label)


class _Garbled(_Market):
    """An account whose provider answered something its adapter did not expect."""

    def list(self, label_prefix):
        raise KeyError("machines")


class _Stuck(_Market):
    def destroy(self, machine_id):
        if machine_id == "m-1":
            raise TypeError("an answer the adapter cannot read")
        super().destroy(machine_id)


@pytest.mark.django_db
def test_one_unreadable_account_or_machine_does_not_stop_reconcile_for_every_other(monkeypatch):
    garbled = _Garbled([])
    stuck = _Stuck([_orphan("m-1", "dumont-123-4"), _orphan("m-2", "dumont-123-5")])
    other_account = _Market([_orphan("m-3", "dumont-456-7")])
    monkeypatch.setattr(reconcile, "clients_for_user",
                        lambda: [("vastai", None, garbled), ("vastai", None, stuck), ("vastai", None, other_account)])
    assert reconcile.reconcile_machines() == ["vastai:m-2", "vastai:m-3"]
    assert stuck.destroyed == ["m-2"] and other_account.destroyed == ["m-3"]


@pytest.mark.django_db
def test_one_instance_failing_its_idleness_check_does_not_stop_the_sweep(user, monkeypatch):
    instances = [make_instance(user, status="running") for _ in range(3)]
    now = timezone.now()
    for instance in instances:
        instance.__class__.objects.filter(pk=instance.pk).update(status_changed_at=now - timedelta(minutes=10))
        Heartbeat.objects.bulk_create(Heartbeat(instance=instance, gpu_util=0.0, received_at=now - timedelta(seconds=age),
                                                nonce=f"{instance.pk}-{age}") for age in range(0, 200, 10))
    real = selectors.instance_is_idle

    def failing_for_the_first(instance, **kwargs):
        if instance.pk == instances[0].pk:
            raise ValueError("a row this code never expected")
        return real(instance, **kwargs)

    monkeypatch.setattr(selectors, "instance_is_idle", failing_for_the_first)
    assert selectors.instances_idle() == [instances[1].pk, instances[2].pk]
