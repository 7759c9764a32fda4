"""kill -9 the worker in the middle of a race: no machine leaks, no second winner."""

import os
import signal

import pytest

from instances.models import Instance
from instances.tasks import reconcile
from machines.models import MachineAttempt
from machines.providers.base import LaunchRequest, OfferQuery
from tests.e2e.conftest import CATALOGUES
from tests.e2e.test_race import wait_for_status, wait_settled
from tests.harness import celery_worker, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
STACK_CATALOGUE = CATALOGUES / "crash.yaml"
STACK_SETTINGS = {
    "RACE_BATCH_TIMEOUT_SECONDS": 60.0,
    "RACE_POLL_INTERVAL_SECONDS": 0.3,
    "RECONCILE_STALE_SECONDS": 0,
}


def test_worker_killed_mid_race_then_reconcile_leaves_only_the_winner(stack_base, api):
    with celery_worker(stack_base.tmp, env=stack_base.env) as worker:
        response = api.post("/api/v1/instances", {"name": "crashy", "gpu_name": "CRASH"}, format="json")
        instance = Instance.objects.get(pk=response.json()["id"])
        wait_until(lambda: MachineAttempt.objects.filter(instance=instance, outcome="booting").count() == 5,
                   timeout=60, what="the first batch to be booting")
        os.killpg(worker.pid, signal.SIGKILL)  # the worker and its pool, mid-race
        worker.wait(timeout=10)
    instance.refresh_from_db()
    assert instance.status == "launching"
    assert len(stack_base.machines(f"{instance.label}-")) == 5  # the batch outlived its worker

    with celery_worker(stack_base.tmp, env=stack_base.env):
        result = reconcile()
        assert result["resumed"] == [instance.pk] and result["destroyed"] == []
        wait_for_status(instance, "running", "failed", timeout=120)
        assert instance.status == "running", instance.status_reason
        wait_settled(instance)
        reconcile()

    winners = MachineAttempt.objects.filter(instance=instance, outcome="won")
    assert winners.count() == 1
    live = stack_base.machines(f"{instance.label}-")
    assert [str(m["id"]) for m in live] == [instance.provider_instance_id] == [winners.get().provider_instance_id]
    stack_base.market.provider().destroy(instance.provider_instance_id)


def test_reconcile_destroys_machines_nobody_owns(stack_base):
    provider = stack_base.market.provider()
    first, second = provider.search_offers(OfferQuery(gpu_name="CRASH"))[:2]
    orphan = provider.create(first, LaunchRequest(label="dumont-999999-1", image="x", disk_gb=10, ssh_public_keys=()))
    foreign = provider.create(second, LaunchRequest(label="someone-else-1", image="x", disk_gb=10, ssh_public_keys=()))
    destroyed = reconcile()["destroyed"]
    assert destroyed == [f"local:{orphan.instance_id}"]
    live_labels = {m["label"] for m in stack_base.machines("")}
    assert "someone-else-1" in live_labels and "dumont-999999-1" not in live_labels
    provider.destroy(foreign.instance_id)
