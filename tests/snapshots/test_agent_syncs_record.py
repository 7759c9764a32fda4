"""The agent's sync report comes from the tenant's machine: a bad one is skipped, never stops the
recording of everyone else's (real restic, real S3)."""

import os
import time

import pytest

from agent import services as agent_services
from agent.auth import Agent
from instances.agent_setup import agent_syncs_record
from snapshots.models import Snapshot
from tests.agent.conftest import reading
from tests.factories import make_instance, make_user

pytestmark = pytest.mark.django_db


def _reports(instance, last: dict) -> None:
    agent = Agent(instance_id=instance.pk, instance_status="running", nonce=os.urandom(16).hex())
    agent_services.heartbeat_record(agent=agent, heartbeat=reading(sync={"state": "idle", "last": last}),
                                    received_at=time.time())


def test_a_bad_sync_report_is_skipped_and_the_others_are_recorded():
    owner = make_user()
    not_an_id, word_duration, honest = (make_instance(owner, status="running") for _ in range(3))
    _reports(not_an_id, {"exit_code": 0, "snapshot_id": "zz", "duration": 3.0})
    _reports(word_duration, {"exit_code": 0, "snapshot_id": "abcdef0123456789", "duration": "long"})
    _reports(honest, {"exit_code": 0, "snapshot_id": "0123456789abcdef", "duration": 4.5})

    recorded = agent_syncs_record()
    snapshots = {s.instance_id: s for s in Snapshot.objects.filter(pk__in=recorded)}
    assert set(snapshots) == {word_duration.pk, honest.pk}
    # neither id is in the repository: recorded, and failed (never verified on the agent's word)
    assert snapshots[honest.pk].status == "failed" and snapshots[honest.pk].duration_seconds == 4.5
    assert snapshots[word_duration.pk].duration_seconds is None
    assert not Snapshot.objects.filter(instance=not_an_id).exists()
