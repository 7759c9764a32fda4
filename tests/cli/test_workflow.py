"""The command line end to end, driven as a user drives it: `dumont` subprocesses and a real OpenSSH client
through `dumont proxy`, against a real stack (web server, Celery worker, local marketplace with real sshd
machines, restic to a real S3 server). One stack for the module."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from instances.models import Instance
from snapshots.models import SnapshotRestore
from tests.cli.helpers import dumont, ssh, ssh_keypair
from tests.harness import REPO_ROOT
from tests.snapshots.helpers import make_workspace, manifest

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
STACK_CATALOGUE = Path(__file__).parent / "catalogue.yaml"
STACK_SERVICES = {"s3", "web"}
STACK_SETTINGS = {
    "RACE_BATCH_TIMEOUT_SECONDS": 20.0,
    "RACE_POLL_INTERVAL_SECONDS": 0.3,
    "AGENT_HEARTBEAT_INTERVAL_SECONDS": 2,
}
PASSWORD = "correct-horse-battery"


@pytest.fixture
def cli_env(stack, user, tmp_path):
    """A logged-in user's environment: own config dir, own SSH key uploaded."""
    env = {**stack.env, "DUMONT_CONFIG_DIR": str(tmp_path / "config"), "TERM": "dumb"}
    dumont("login", "--url", stack.web_url, "--username", user.username, env={**env, "DUMONT_PASSWORD": PASSWORD})
    key = ssh_keypair(tmp_path)
    dumont("ssh-key", "add", f"{key}.pub", "--name", "laptop", env=env)
    return env, key


def api_requests_in(log: Path, since: int) -> list[str]:
    """The API requests the web server logged after byte `since`, without the agents' heartbeats."""
    with open(log, "rb") as f:
        f.seek(since)
        lines = f.read().decode(errors="replace").splitlines()
    return [line for line in lines if "/api/v1/" in line and "/api/v1/agent/" not in line]


def workspace_of(stack, name: str) -> Path:
    machine = Instance.objects.exclude(status="destroyed").get(name=name).provider_instance_id
    return Path(stack.market.control.instance(machine)["workspace"])


def test_up_ssh_hibernate_then_ssh_wakes_it_with_the_files_intact(stack, cli_env, tmp_path):
    env, key = cli_env
    up = dumont("up", "cli-1", "--gpu", "CLI", "--max-price", "0.5", env=env)
    assert "cli-1 is running" in up.stdout and "ssh dumont-cli-1" in up.stdout
    assert "round 1" in up.stderr and "won" in up.stderr  # the race, as plain lines off a terminal

    ssh_dir = tmp_path / "home" / ".ssh"
    ssh_dir.mkdir(parents=True)
    (ssh_dir / "config").write_text("Host other\n    User someone\n")
    dumont("ssh-config", "--write", "--ssh-config", str(ssh_dir / "config"), env=env)
    user_config = (ssh_dir / "config").read_text()
    assert user_config.splitlines()[1] == f"Include {tmp_path / 'config' / 'ssh_config'}"
    assert "Host other" in user_config  # kept
    dumont("ssh-config", "--write", "--ssh-config", str(ssh_dir / "config"), env=env)
    assert (ssh_dir / "config").read_text() == user_config  # written once

    # a real ssh through the proxy writes into the workspace
    written = ssh(ssh_dir / "config", key, "dumont-cli-1", 'echo "from my laptop" > "$DUMONT_WORKSPACE/notes.txt"')
    assert written.returncode == 0, written.stderr
    workspace = workspace_of(stack, "cli-1")
    make_workspace(workspace, weights_mb=2, source_files=20)
    expected = manifest(workspace)
    assert (workspace / "notes.txt").read_text() == "from my laptop\n"

    # a running instance: the proxy costs one API call
    log = stack.tmp / "web.log"
    before = log.stat().st_size
    assert ssh(ssh_dir / "config", key, "dumont-cli-1", "true").returncode == 0
    calls = api_requests_in(log, before)
    assert len(calls) == 1 and "GET /api/v1/instances?name=cli-1" in calls[0], calls

    listed = json.loads(dumont("ls", "--json", env=env).stdout)
    assert [(i["name"], i["status"]) for i in listed] == [("cli-1", "running")]
    first_machine = listed[0]["machine"]["provider_instance_id"]

    hibernated = dumont("hibernate", "cli-1", env=env)
    assert "cli-1 is hibernated" in hibernated.stdout
    snapshots = json.loads(dumont("snapshots", "cli-1", "--json", env=env).stdout)
    assert [(s["reason"], s["status"]) for s in snapshots] == [("hibernate", "verified")]
    assert stack.machines(f"{Instance.objects.get(name='cli-1').label}-") == []

    # the wake on SSH: ssh alone wakes it, shows progress on stderr, runs the command
    woken = ssh(ssh_dir / "config", key, "dumont-cli-1", 'cat "$DUMONT_WORKSPACE/notes.txt"')
    assert woken.returncode == 0, woken.stderr
    assert woken.stdout == "from my laptop\n"
    assert "is hibernated: wake" in woken.stderr and "restored" in woken.stderr and "connecting" in woken.stderr
    status = json.loads(dumont("status", "cli-1", "--json", env=env).stdout)
    assert status["status"] == "running" and status["machine"]["provider_instance_id"] != first_machine
    assert manifest(workspace_of(stack, "cli-1")) == expected

    # scp (SFTP) goes through the same alias
    copied = tmp_path / "copied.txt"
    scp = subprocess.run(["scp", "-q", "-F", str(ssh_dir / "config"), "-i", str(key), "-o", "IdentitiesOnly=yes",
                          "-o", "BatchMode=yes", f"dumont-cli-1:{workspace_of(stack, 'cli-1') / 'notes.txt'}",
                          str(copied)], capture_output=True, text=True, timeout=60)
    assert scp.returncode == 0 and copied.read_text() == "from my laptop\n", scp.stderr

    down = dumont("down", "cli-1", env=env)
    assert "cli-1 is destroyed" in down.stdout
    assert stack.machines(f"{Instance.objects.get(name='cli-1').label}-") == []


def test_a_host_key_other_than_the_pinned_one_is_refused(stack, cli_env, tmp_path):
    env, key = cli_env
    config = tmp_path / "ssh_config"
    config.write_text(dumont("ssh-config", env=env).stdout)  # before the instance exists: its `dumont-*` block
    assert "Host dumont-key-1" not in config.read_text()
    dumont("up", "key-1", "--gpu", "KEY", env=env)
    assert ssh(config, key, "dumont-key-1", "true").returncode == 0
    known_hosts = (tmp_path / "config" / "known_hosts").read_text()
    instance = Instance.objects.get(name="key-1")
    assert known_hosts == f"dumont-key-1 {instance.ssh_host_key}\n"

    # the control plane pinned another key than the machine shows (a machine in the middle, say)
    other = Ed25519PrivateKey.generate().public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                   serialization.PublicFormat.OpenSSH).decode()
    Instance.objects.filter(pk=instance.pk).update(ssh_host_key=other)
    refused = ssh(config, key, "dumont-key-1", "echo should-not-run")
    assert refused.returncode == 255 and "should-not-run" not in refused.stdout
    assert "Host key verification failed" in refused.stderr or "HOST IDENTIFICATION HAS CHANGED" in refused.stderr
    assert (tmp_path / "config" / "known_hosts").read_text() == f"dumont-key-1 {other}\n"

    Instance.objects.filter(pk=instance.pk).update(ssh_host_key=instance.ssh_host_key)
    assert ssh(config, key, "dumont-key-1", "true").returncode == 0
    dumont("down", "key-1", env=env)


def test_up_under_a_terminal_shows_the_live_race_and_ends_cleanly(stack, cli_env):
    env, _ = cli_env
    child = pexpect.spawn(sys.executable, ["-m", "dumont_cli", "up", "tty-1", "--gpu", "TTY"], cwd=str(REPO_ROOT),
                          env={**env, "TERM": "xterm-256color"}, dimensions=(40, 120), encoding="utf-8",
                          timeout=180)
    child.logfile_read = screen = io.StringIO()
    child.expect("round 1: 2 machines booting")  # the live view's spinner line, while the race runs
    child.expect("tty-1 is running")
    child.expect(pexpect.EOF)
    child.close()
    output = screen.getvalue()
    assert child.exitstatus == 0, output
    # the live view hid the cursor while it ran and gave it back at the end
    assert "\x1b[?25l" in output and output.rindex("\x1b[?25h") > output.rindex("\x1b[?25l")
    # then the race table stays (winner and the destroyed loser) and the SSH line comes last
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output)
    assert re.search(r"│ 1 +│ 90[34] .*│ won", text) and re.search(r"│ 1 +│ 90[34] .*│ destroyed \(lost\)", text), text
    assert text.rstrip().splitlines()[-1].startswith("tty-1 is running: ssh dumont-tty-1")
    dumont("down", "tty-1", env=env)


def test_snapshot_restore_keep_awake_pause_then_ssh_resumes_it(stack, cli_env, tmp_path):
    env, key = cli_env
    dumont("up", "ops-1", "--gpu", "OPS", env=env)
    workspace = workspace_of(stack, "ops-1")
    (workspace / "model.txt").write_text("epoch 1\n")

    assert "ops-1 kept awake until" in dumont("keep-awake", "ops-1", "2h", env=env).stdout
    taken = dumont("snapshot", "ops-1", "--fast", env=env).stdout
    snapshot_id = re.match(r"snapshot (\d+) verified", taken)[1]
    (workspace / "model.txt").write_text("epoch 2, diverged\n")
    restored = re.match(r"restore (\d+) succeeded", dumont("restore", snapshot_id, "ops-1", env=env).stdout)
    assert (workspace / "model.txt").read_text() == "epoch 1\n"
    # asked with --fast, the snapshot has a fast path, and the restore over the running workspace used it
    assert SnapshotRestore.objects.get(pk=restored[1]).method == "fastpath"
    kinds = [json.loads(line)["kind"] for line in dumont("events", "ops-1", "--json", env=env).stdout.splitlines()]
    assert {"race", "snapshot", "restore"} <= set(kinds)

    # `dumont ssh NAME -- cmd` runs a command (through the proxy)
    ran = dumont("ssh", "ops-1", "-i", str(key), "--", "cat", "$DUMONT_WORKSPACE/model.txt", env=env)
    assert ran.stdout == "epoch 1\n"

    assert "ops-1 is paused" in dumont("pause", "ops-1", env=env).stdout
    config = tmp_path / "ssh_config"
    config.write_text(dumont("ssh-config", env=env).stdout)
    resumed = ssh(config, key, "dumont-ops-1", "echo awake")
    assert resumed.returncode == 0 and resumed.stdout == "awake\n", resumed.stderr
    assert "is paused: resume" in resumed.stderr
    assert json.loads(dumont("status", "ops-1", "--json", env=env).stdout)["status"] == "running"
    dumont("down", "ops-1", env=env)
