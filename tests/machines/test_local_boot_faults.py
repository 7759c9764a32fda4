"""A local machine that cannot boot for a reason of this marketplace's own (sshd missing, sshd failing to
listen): the provider says why, in words a user can act on, and flags it as the platform's fault (not the
host's), which is what makes a launch race stop instead of renting more machines that would fail alike."""

from __future__ import annotations

from pathlib import Path

from dumont.bench.marketplace import running_marketplace
from machines.providers.base import STATUS_FAILED, LaunchRequest, OfferQuery
from machines.ssh import generate_keypair
from tests.harness import wait_until

FAST_HOST = "10001"  # fast-4090-us: boots at once at time_scale 0.01


def boot_one(tmp_path: Path, sshd_binary: Path):
    public_key = generate_keypair(tmp_path / "id_ed25519")
    with running_marketplace(tmp_path / "m", time_scale=0.01, env={"DUMONT_SSHD_BINARY": str(sshd_binary)}) as market:
        provider = market.provider(timeout=5)
        offer = next(o for o in provider.search_offers(OfferQuery(gpu_name="RTX 4090")) if o.host_id == FAST_HOST)
        created = provider.create(offer, LaunchRequest(label="fault-1", image="dumont/base", disk_gb=10,
                                                       ssh_public_keys=(public_key,)))
        return wait_until(lambda: (m := provider.get(created.instance_id)).status == STATUS_FAILED and m,
                          timeout=30, what="the boot to fail")


def test_a_missing_sshd_is_reported_with_the_package_that_installs_it(tmp_path):
    machine = boot_one(tmp_path, tmp_path / "nowhere" / "sshd")
    assert machine.platform_fault
    assert "sshd" in machine.status_message
    assert "sudo apt-get install -y openssh-server" in machine.status_message


def test_an_sshd_that_cannot_bind_its_port_is_reported_with_its_own_words(tmp_path):
    fake = tmp_path / "sshd"
    fake.write_text("#!/bin/sh\necho 'Bind to port 2222 on 127.0.0.1 failed: Address already in use.' >&2\nexit 255\n")
    fake.chmod(0o755)
    machine = boot_one(tmp_path, fake)
    assert machine.platform_fault
    assert "Address already in use" in machine.status_message
    assert "could not boot" in machine.status_message


def test_a_host_that_exits_is_not_a_platform_fault(tmp_path):
    fate_host = "10009"  # its container exits during start: the host's fault, not ours
    public_key = generate_keypair(tmp_path / "id_ed25519")
    with running_marketplace(tmp_path / "m", time_scale=0.01) as market:
        provider = market.provider(timeout=5)
        offer = next(o for o in provider.search_offers(OfferQuery(gpu_name="RTX 3090")) if o.host_id == fate_host)
        created = provider.create(offer, LaunchRequest(label="exit-1", image="dumont/base", disk_gb=10,
                                                       ssh_public_keys=(public_key,)))
        machine = wait_until(lambda: (m := provider.get(created.instance_id)).status == STATUS_FAILED and m,
                             timeout=30, what="the host to exit")
    assert not machine.platform_fault and machine.status_message == "container exited during start"


def test_the_marketplace_serves_where_local_marketplace_url_says(monkeypatch):
    from machines.providers.local import cli

    monkeypatch.setenv("LOCAL_MARKETPLACE_URL", "http://127.0.0.1:8125")
    assert cli._parser().parse_args(["serve"]).port == 8125
    monkeypatch.delenv("LOCAL_MARKETPLACE_URL")
    assert cli._parser().parse_args(["serve"]).port == cli.DEFAULT_PORT
