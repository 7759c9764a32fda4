"""What counts as idle: the GPU under the threshold for the whole window, with heartbeats throughout."""

from datetime import UTC, datetime, timedelta

import pytest

from instances.hibernation import is_idle

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
