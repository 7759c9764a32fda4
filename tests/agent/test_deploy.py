"""agent_deploy onto a real local-marketplace machine (real sshd, real processes), heartbeating to a
live server: the agent outlives the SSH session, a redeploy replaces it, a crash restarts it, and
destroying the machine kills it."""

import contextlib
import os
import signal
from pathlib import Path

import pytest

from agent import selectors
from agent.deploy import agent_deploy
from agent.services import agent_credential_issue
from dumont.bench.marketplace import running_marketplace
from machines.providers.base import LaunchRequest, OfferQuery
from machines.ssh import SSHTarget, connect, generate_keypair
from tests.factories import make_instance, make_user
from tests.harness import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
FAST_HOST = "10001"


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    with running_marketplace(tmp_path_factory.mktemp("market"), time_scale=0.01) as handle:
        yield handle


def agent_pids(machine_id: str) -> list[int]:
    """The machine's running DumontAgent processes (not the supervisor shell)."""
    marker = f"DUMONT_MACHINE_ID={machine_id}".encode()
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
            state = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if (b"dumont_agent.py" in cmdline and b"python" in cmdline and state not in ("Z", "X")
                    and marker in Path(f"/proc/{name}/environ").read_bytes().split(b"\0")):
                found.append(int(name))
    return found


def test_a_deployed_agent_outlives_ssh_heartbeats_restarts_and_dies_with_its_machine(
    market, live_server, settings, tmp_path
):
    settings.AGENT_HEARTBEAT_INTERVAL_SECONDS = 0.2
    key = tmp_path / "id_ed25519"
    provider = market.provider(timeout=5)
    offer = next(o for o in provider.search_offers(OfferQuery(gpu_name="RTX 4090")) if o.host_id == FAST_HOST)
    created = provider.create(offer, LaunchRequest(label="agent-deploy", image="dumont/base:latest", disk_gb=20,
                                                   ssh_public_keys=(generate_keypair(key),)))
    machine_id = created.instance_id
    machine = wait_until(lambda: (m := provider.get(machine_id)).ssh_ready and m, timeout=30, what="the machine")
    target = SSHTarget(machine.ssh_host, machine.ssh_port, machine.ssh_user, machine.ssh_host_key)
    instance = make_instance(make_user(), status="running", provider_instance_id=machine_id)
    secret = agent_credential_issue(instance.pk)

    def latest_where(predicate, what):
        return wait_until(lambda: (h := selectors.latest_heartbeat(instance.pk)) and predicate(h) and h,
                          timeout=20, interval=0.05, what=what)

    deploy = {"target": target, "private_key": key, "instance_id": instance.pk, "secret": secret,
              "control_plane_url": live_server.url}
    agent_deploy(**deploy)  # its SSH session is closed when it returns
    market.control.set_gpu_util(machine_id, 63)
    beat = latest_where(lambda h: h["gpu_util"] == 63.0, "the machine's 63% through the agent")
    assert beat["gpu_metrics"]["source"] == "file"
    [first] = agent_pids(machine_id)
    with connect(target, key) as session:
        mode = session.run('stat -c %a "$HOME/.dumont-agent/config.json"', check=True).stdout.strip()
    assert mode == "600"
    assert secret.encode() not in Path(f"/proc/{first}/cmdline").read_bytes()

    agent_deploy(**deploy)  # a redeploy replaces the running agent: still exactly one
    [second] = agent_pids(machine_id)
    assert second != first
    market.control.set_gpu_util(machine_id, 21)
    latest_where(lambda h: h["gpu_util"] == 21.0, "the redeployed agent's heartbeat")

    os.kill(second, signal.SIGKILL)  # a crash: its supervisor starts it again
    third = wait_until(lambda: [p for p in agent_pids(machine_id) if p != second], timeout=15, what="a restart")
    assert len(third) == 1
    restarted_at = selectors.latest_heartbeat(instance.pk)["received_at"]
    latest_where(lambda h: h["received_at"] > restarted_at, "heartbeats from the restarted agent")

    provider.destroy(machine_id)
    assert agent_pids(machine_id) == []
