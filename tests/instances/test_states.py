import threading

import pytest
from django.db import connection

from instances.models import Instance, InstanceEvent
from instances.states import ACTIVE, TERMINAL, TRANSITIONS, IllegalTransition, Status, transition
from tests.factories import make_instance, make_user


def test_every_status_has_a_transition_entry_and_groups_partition_the_statuses():
    assert set(TRANSITIONS) == set(Status)
    assert ACTIVE | TERMINAL == set(Status) and not ACTIVE & TERMINAL
    assert TRANSITIONS[Status.DESTROYED] == frozenset()


@pytest.mark.django_db
def test_legal_transition_writes_exactly_one_event():
    instance = make_instance(make_user(), status=Status.RUNNING)
    updated = transition(instance.pk, Status.HIBERNATING, message="idle for 3 minutes", data={"idle_s": 180})
    assert updated.status == Status.HIBERNATING
    assert Instance.objects.get(pk=instance.pk).status == Status.HIBERNATING
    events = list(InstanceEvent.objects.filter(instance=instance))
    assert len(events) == 1
    assert events[0].data == {"from": "running", "to": "hibernating", "idle_s": 180}


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("current", "target"),
    [(Status.DESTROYED, Status.RUNNING), (Status.HIBERNATED, Status.RUNNING), (Status.PENDING, Status.HIBERNATED),
     (Status.FAILED, Status.RUNNING), (Status.RUNNING, Status.RUNNING)],
)
def test_illegal_transition_is_refused_and_leaves_no_event(current, target):
    instance = make_instance(make_user(), status=current)
    with pytest.raises(IllegalTransition) as refused:
        transition(instance.pk, target)
    assert refused.value.http_status == 409
    assert Instance.objects.get(pk=instance.pk).status == current
    assert not InstanceEvent.objects.filter(instance=instance).exists()


@pytest.mark.django_db
def test_transition_from_an_unexpected_status_is_refused():
    instance = make_instance(make_user(), status=Status.RUNNING)
    with pytest.raises(IllegalTransition, match="expected paused"):
        transition(instance.pk, Status.DESTROYING, expected=Status.PAUSED)
    assert not InstanceEvent.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_two_transactions_racing_for_the_same_transition_produce_one_winner():
    instance = make_instance(make_user(), status=Status.RUNNING)
    start = threading.Barrier(4)
    outcomes: list[str] = []

    def contender():
        start.wait()
        try:
            transition(instance.pk, Status.HIBERNATING, expected=Status.RUNNING)
            outcomes.append("won")
        except IllegalTransition:
            outcomes.append("refused")
        finally:
            connection.close()

    threads = [threading.Thread(target=contender) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(outcomes) == ["refused", "refused", "refused", "won"]
    assert InstanceEvent.objects.filter(instance=instance, kind="status").count() == 1
    assert Instance.objects.get(pk=instance.pk).status == Status.HIBERNATING


@pytest.mark.django_db
def test_events_are_append_only():
    instance = make_instance(make_user(), status=Status.RUNNING)
    event = transition(instance.pk, Status.PAUSED).events.get()
    event.message = "rewritten"
    with pytest.raises(ValueError, match="append-only"):
        event.save()
