"""The real DumontAgent, as a subprocess, against a live server (Django in a thread, real Redis and
PostgreSQL). The server answers `interval: 0.2` so that each test takes seconds."""

import json
import sys
import time
from urllib.parse import urlparse

import pytest

from agent import selectors, services
from agent.models import Heartbeat
from instances.states import Status, transition
from tests.agent.daemon_helpers import TcpGate, agent_running
from tests.factories import make_instance, make_user
from tests.harness import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def instance(settings):
    settings.AGENT_HEARTBEAT_INTERVAL_SECONDS = 0.2
    instance = make_instance(make_user(), status="running")
    return instance, services.agent_credential_issue(instance.pk)


def latest_where(instance, predicate, what: str, timeout: float = 10):
    def check():
        latest = selectors.latest_heartbeat(instance.pk)
        return latest if latest and predicate(latest) else None

    return wait_until(check, timeout=timeout, interval=0.05, what=what)


def test_reports_the_simulated_gpu_and_a_missing_reading_never_as_zero(live_server, instance, tmp_path):
    instance, secret = instance
    util_file = tmp_path / "gpu_util"
    util_file.write_text("42\n")
    with agent_running(tmp_path / "agent", url=live_server.url, instance_id=instance.pk, secret=secret,
                       env={"DUMONT_GPU_UTIL_FILE": str(util_file)}) as agent:
        first = latest_where(instance, lambda h: h["gpu_util"] == 42.0, "the file's 42%")
        assert first["gpu_metrics"]["source"] == "file" and first["gpu_metrics"]["gpus"][0]["util"] == 42.0
        util_file.write_text("7.5\n")
        latest_where(instance, lambda h: h["gpu_util"] == 7.5, "the file's new 7.5%")

        util_file.unlink()
        missing = latest_where(instance, lambda h: h["gpu_metrics"]["error"], "a missing reading")
        assert missing["gpu_util"] is None and "cannot read" in missing["gpu_metrics"]["error"]
        util_file.write_text("idle?\n")
        latest_where(instance, lambda h: "number" in (h["gpu_metrics"]["error"] or ""), "an unreadable value")
        assert agent.process.poll() is None
        log = agent.log
    services.heartbeats_flush()
    utils = list(Heartbeat.objects.filter(instance=instance).values_list("gpu_util", flat=True))
    assert None in utils and 42.0 in utils and 0.0 not in utils
    assert secret not in log


def test_backs_off_while_the_control_plane_is_down_then_sends_only_fresh_readings(live_server, instance, tmp_path):
    instance, secret = instance
    server = urlparse(live_server.url)
    gate = TcpGate((server.hostname, server.port))  # closed: connections are refused
    util_file = tmp_path / "gpu_util"
    util_file.write_text("3\n")
    try:
        with agent_running(tmp_path / "agent", url=gate.url, instance_id=instance.pk, secret=secret,
                           env={"DUMONT_GPU_UTIL_FILE": str(util_file)}, backoff_initial=0.05,
                           backoff_max=0.4) as agent:
            wait_until(lambda: len(agent.retry_delays()) >= 6, timeout=15, interval=0.05, what="six retries")
            delays = agent.retry_delays()
            # exponential until the cap (0.05, 0.1, 0.2, 0.4 times 0.5..1 of jitter), then capped
            assert all(b >= a for a, b in zip(delays[:3], delays[1:4], strict=True)) and delays[3] >= 4 * delays[0]
            assert max(delays) <= 0.4
            assert selectors.latest_heartbeat(instance.pk) is None

            opened_at = time.time()
            gate.open()
            latest_where(instance, lambda h: True, "the first heartbeat after the outage")
            failures = len(agent.retry_delays())
            latest_where(instance, lambda h: h["received_at"].timestamp() > time.time() - 0.1, "a steady beat")
            assert len(agent.retry_delays()) == failures  # recovered: no more failures
    finally:
        gate.close()
    services.heartbeats_flush()
    readings = list(Heartbeat.objects.filter(instance=instance).values_list("agent_time", "received_at"))
    assert readings
    # nothing read during the outage was queued and sent later: every reading is at most one backoff old
    assert min(agent_time.timestamp() for agent_time, _ in readings) > opened_at - 0.5
    assert all((received - agent_time).total_seconds() < 0.5 for agent_time, received in readings)


SYNC_SCRIPT = r"""
import json, os, sys, time
log = os.environ["SYNC_LOG"]
with open(log, "a") as f: f.write("start %f\n" % time.time())
time.sleep(0.3)
if os.path.exists(os.environ["SYNC_FAIL"]):
    sys.stderr.write("Fatal: unable to open repository: wrong password\n")
    sys.exit(3)
print(json.dumps({"message_type": "status", "percent_done": 0.5}))
print(json.dumps({"message_type": "summary", "snapshot_id": "5f3c9a1e", "files_new": 2}))
with open(log, "a") as f: f.write("end %f\n" % time.time())
"""


def test_runs_the_sync_command_one_at_a_time_and_reports_it(live_server, instance, tmp_path):
    instance, secret = instance
    sync_log, fail_flag = tmp_path / "sync.log", tmp_path / "fail"
    sync = {"command": [sys.executable, "-c", SYNC_SCRIPT], "interval": 0.05,
            "env": {"SYNC_LOG": str(sync_log), "SYNC_FAIL": str(fail_flag), "RESTIC_PASSWORD": "hunter2-restic"}}
    with agent_running(tmp_path / "agent", url=live_server.url, instance_id=instance.pk, secret=secret,
                       sync=sync) as agent:
        ok = latest_where(instance, lambda h: h["sync"].get("runs", 0) >= 2, "two sync runs")
        last = ok["sync"]["last"]
        assert (last["exit_code"], last["snapshot_id"], last["error_tail"]) == (0, "5f3c9a1e", None)
        assert last["duration"] >= 0.3 and last["started_at"] <= time.time()

        fail_flag.touch()
        failed = latest_where(instance, lambda h: (h["sync"]["last"] or {}).get("exit_code") == 3, "a failed sync")
        assert "wrong password" in failed["sync"]["last"]["error_tail"]
        assert failed["sync"]["last"]["snapshot_id"] is None
        log = agent.log
    starts = [float(at) for kind, at in (line.split() for line in sync_log.read_text().splitlines()) if kind == "start"]
    assert len(starts) >= 3
    assert all(b - a >= 0.3 for a, b in zip(starts, starts[1:], strict=False))  # never two at once
    assert "hunter2-restic" not in log and secret not in log


def test_obeys_prepare_hibernate_and_shutdown(live_server, instance, tmp_path):
    instance, secret = instance
    sync = {"command": [sys.executable, "-c", "pass"], "interval": 0.05}
    with agent_running(tmp_path / "agent", url=live_server.url, instance_id=instance.pk, secret=secret,
                       sync=sync) as agent:
        latest_where(instance, lambda h: h["sync"].get("runs", 0) >= 1, "a first sync")
        transition(instance.pk, Status.HIBERNATING)
        ready = latest_where(instance, lambda h: h["agent_state"] == "hibernate_ready", "hibernate_ready")
        runs = ready["sync"]["runs"]
        later = latest_where(instance, lambda h: h["received_at"] > ready["received_at"], "another heartbeat")
        later = latest_where(instance, lambda h: h["received_at"] > later["received_at"], "one more")
        assert later["sync"]["runs"] == runs and later["sync"]["state"] == "paused"  # no new sync

        transition(instance.pk, Status.RUNNING)  # hibernation called off: syncs again
        latest_where(instance, lambda h: h["agent_state"] == "running" and h["sync"]["runs"] > runs, "syncs again")

        transition(instance.pk, Status.DESTROYING)
        assert agent.process.wait(10) == 0  # exit 0: its supervisor does not restart it
        assert "shutdown" in agent.log


def test_a_bad_config_exits_non_zero_and_says_why(tmp_path):
    with agent_running(tmp_path / "agent", url="http://127.0.0.1:9", instance_id=1, secret="") as agent:
        assert agent.process.wait(10) == 2
        assert "config lacks secret" in agent.log


def test_the_config_file_holds_the_secret_and_the_command_line_does_not(live_server, instance, tmp_path):
    instance, secret = instance
    with agent_running(tmp_path / "agent", url=live_server.url, instance_id=instance.pk, secret=secret) as agent:
        latest_where(instance, lambda h: True, "a heartbeat")
        cmdline = open(f"/proc/{agent.process.pid}/cmdline", "rb").read().decode()
        state_file = tmp_path / "agent" / "state.json"
        # the agent writes its state once the answer is in, a moment after the server buffered the heartbeat
        wait_until(lambda: state_file.exists() and json.loads(state_file.read_text()).get("action"), timeout=10,
                   what="the agent's state with the answered action")
        state = json.loads(state_file.read_text())
    assert secret not in cmdline and state["pid"] == agent.process.pid and state["action"] == "none"


def test_renews_the_syncs_storage_keys_before_they_expire(live_server, instance, tmp_path, settings):
    """Temporary keys (`r2`): once a quarter of their life is left, the agent asks the control plane for
    new ones before its next run; the repository password it already has stays as it is."""
    from dumont.s3server import machine_key_of
    from snapshots.models import SnapshotRepository
    from tests.agent.test_sync_credentials import machine_key_for

    instance, secret = instance
    settings.SNAPSHOT_MACHINE_CREDENTIALS, settings.SNAPSHOT_S3_BUCKET = "scoped", "dumont-test"
    repository = SnapshotRepository.objects.create(owner=instance.owner, prefix=f"users/{instance.owner_id}/cd34",
                                                   password="restic-password", initialized_at="2026-11-29T00:00:00Z")
    machine_key = machine_key_for(instance, repository)

    def renewed(key_id: str) -> bool:
        found = machine_key_of(key_id)
        return found is not None and (found.scope, found.holder) == (f"dumont-test/{repository.prefix}",
                                                                       machine_key.label)
    keys_log = tmp_path / "keys.log"
    script = ("import os\nwith open(os.environ['KEYS_LOG'], 'a') as f:\n"
              "    f.write(os.environ['AWS_ACCESS_KEY_ID'] + ' ' + os.environ['RESTIC_PASSWORD'] + '\\n')\n")
    sync = {"command": [sys.executable, "-c", script], "interval": 0.2, "env_expires_at": time.time() + 4,
            "env": {"KEYS_LOG": str(keys_log), "AWS_ACCESS_KEY_ID": "old-key", "AWS_SECRET_ACCESS_KEY": "old",
                    "RESTIC_PASSWORD": "restic-password"}}
    with agent_running(tmp_path / "agent", url=live_server.url, instance_id=instance.pk, secret=secret,
                       sync=sync) as agent:
        wait_until(lambda: keys_log.exists() and renewed(keys_log.read_text().splitlines()[-1].split()[0]),
                   timeout=20, what="a run with the renewed keys")
        log = agent.log
    runs = keys_log.read_text().splitlines()
    assert runs[0] == "old-key restic-password"  # far from expiry: the keys it was given
    assert renewed(runs[-1].split()[0]) and runs[-1].endswith(" restic-password")
    assert "renewed" in log and secret not in log
