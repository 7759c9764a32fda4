"""What counts as idle: the GPU under the threshold for the whole window, with heartbeats throughout."""

from datetime import UTC, datetime, timedelta

import pytest
from django.utils import timezone as django_timezone

from agent.models import Heartbeat
from instances.models import Instance
from instances.selectors import instances_idle, instances_to_release, is_idle
from tests.factories import make_instance

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
WINDOW, THRESHOLD, GAP = 180.0, 5.0, 30.0


def stream(value, *, every=10, seconds=190, skip=()):
    """A heartbeat every `every` seconds over the last `seconds`, at `value` % (a callable of the age)."""
    samples = []
    for age in range(0, seconds + 1, every):
        if any(start <= age < end for start, end in skip):
            continue
        samples.append((NOW - timedelta(seconds=age), value(age) if callable(value) else value))
    return samples


def idle(samples):
    return is_idle(samples, now=NOW, window=WINDOW, threshold=THRESHOLD, max_gap=GAP)


def test_a_4_9_percent_stream_is_idle_and_5_0_is_not():
    assert idle(stream(4.9))
    assert not idle(stream(5.0))


def test_a_single_busy_sample_resets_the_clock():
    assert not idle(stream(lambda age: 80.0 if age == 100 else 0.0))
    assert idle(stream(lambda age: 80.0 if age == 185 else 0.0))  # before the window: no longer counts


def test_a_gap_in_heartbeats_is_not_idleness():
    assert not idle(stream(0.0, skip=[(50, 90)]))  # 40 s without a heartbeat inside the window
    assert not idle(stream(0.0, seconds=100))  # heartbeats only for the last 100 s of the window
    assert not idle(stream(0.0, skip=[(0, 40)]))  # silent for the last 40 s: maybe lost, not idle
    assert not idle([])


def test_a_missing_reading_is_not_idleness():
    assert not idle(stream(lambda age: None if age == 60 else 0.0))


def test_the_edges_of_the_gap_tolerance():
    assert idle(stream(0.0, every=30))
    assert not idle(stream(0.0, every=31))


@pytest.mark.parametrize("threshold", [5.0, 10.0])
def test_the_threshold_is_a_setting(threshold):
    assert is_idle(stream(7.0), now=NOW, window=WINDOW, threshold=threshold, max_gap=GAP) == (threshold > 7.0)


# ---- the sweep's choice, on real heartbeat rows -----------------------------------------------



def running_for(user, minutes: int, **fields) -> Instance:
    instance = make_instance(user, status="running", **fields)
    Instance.objects.filter(pk=instance.pk).update(status_changed_at=django_timezone.now() - timedelta(minutes=minutes))
    return instance


def beats(instance, value, *, seconds=200, every=10, skip=()):
    now = django_timezone.now()
    Heartbeat.objects.bulk_create(
        Heartbeat(instance=instance, gpu_util=value, received_at=now - timedelta(seconds=age), nonce=f"{instance.pk}-{age}")
        for age in range(0, seconds, every) if not any(a <= age < b for a, b in skip)
    )


@pytest.mark.django_db
def test_the_sweep_picks_only_proven_idle_instances(user):
    idle = running_for(user, 10)
    beats(idle, 4.9)
    at_threshold = running_for(user, 10)
    beats(at_threshold, 5.0)
    with_gap = running_for(user, 10)
    beats(with_gap, 0.0, skip=[(60, 120)])
    silent = running_for(user, 10)
    kept_awake = running_for(user, 10, keep_awake_until=django_timezone.now() + timedelta(minutes=5))
    beats(kept_awake, 0.0)
    just_started = running_for(user, 1)
    beats(just_started, 0.0, seconds=60)
    assert instances_idle() == [idle.pk]
    assert silent.pk not in instances_idle()


@pytest.mark.django_db
def test_a_failed_hibernation_backs_off(user, settings):
    instance = running_for(user, 10)
    beats(instance, 0.0)
    instance.events.create(kind="hibernate", message="aborted", data={"failed": True})
    assert instances_idle() == []  # within the first minute of backoff
    settings.HIBERNATE_RETRY_BASE_SECONDS = 0
    assert instances_idle() == [instance.pk]


@pytest.mark.django_db
def test_release_comes_after_30_minutes_hibernated(user):
    recent = make_instance(user, status="hibernated")
    old = make_instance(user, status="hibernated")
    Instance.objects.filter(pk=old.pk).update(status_changed_at=django_timezone.now() - timedelta(minutes=31))
    assert instances_to_release() == [old.pk]
    assert recent.pk not in instances_to_release()
