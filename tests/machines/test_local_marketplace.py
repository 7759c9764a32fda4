"""The vast.ai adapter (as LocalProvider) against a real local marketplace: real HTTP, real sshd,
real processes. One marketplace per module; every test leaves it empty (destroy_all) and fault-free."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import requests

from dumont.bench.marketplace import MarketplaceHandle, processes_under, running_marketplace
from machines.providers.base import (
    STATUS_CREATING,
    STATUS_FAILED,
    STATUS_GONE,
    STATUS_RUNNING,
    STATUS_STOPPED,
    CapacityError,
    LaunchRequest,
    Offer,
    OfferQuery,
    ProviderInstance,
    get_provider,
)
from machines.providers.local import LocalProvider
from machines.providers.local.cli import main as marketplace_main
from machines.ssh import SSHConnectError, SSHTarget, connect, generate_keypair, wait_for_ssh

FAST_HOST = "10001"  # fast-4090-us: boots in ~0.08 s at time_scale 0.01


def wait_for(predicate: Callable[[], Any], timeout: float = 15, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        result = predicate()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(delay)
        delay = min(delay * 1.5, 0.2)


@pytest.fixture(scope="module")
def market(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MarketplaceHandle]:
    with running_marketplace(tmp_path_factory.mktemp("market"), time_scale=0.01) as handle:
        yield handle


@pytest.fixture(scope="module")
def ssh_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("keys") / "id_ed25519"
    return path, generate_keypair(path)


@pytest.fixture
def provider(market: MarketplaceHandle) -> Iterator[LocalProvider]:
    yield market.provider(timeout=5)
    market.control.destroy_all()
    market.control.clear_faults()


def _offer(provider: LocalProvider, host_id: str, **query: Any) -> Offer:
    offers = provider.search_offers(OfferQuery(**query))
    return next(o for o in offers if o.host_id == host_id)


def _launch(ssh_key: tuple[Path, str], label: str, onstart: str = "") -> LaunchRequest:
    return LaunchRequest(label=label, image="dumont/base:latest", disk_gb=20, ssh_public_keys=(ssh_key[1],),
                         env={"GREETING": "hello from env"}, onstart=onstart)  # fmt: skip


def _running(provider: LocalProvider, instance_id: str) -> ProviderInstance:
    def check() -> ProviderInstance | None:
        inst = provider.get(instance_id)
        assert inst.status in (STATUS_CREATING, STATUS_RUNNING), inst
        return inst if inst.ssh_ready else None

    return wait_for(check, what=f"instance {instance_id} running")


def _target(inst: ProviderInstance) -> SSHTarget:
    assert inst.ssh_host and inst.ssh_port and inst.ssh_host_key
    return SSHTarget(inst.ssh_host, inst.ssh_port, inst.ssh_user, inst.ssh_host_key)


def _refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def _machine_processes(machine_id: str) -> list[int]:
    marker = f"DUMONT_MACHINE_ID={machine_id}".encode()
    found = []
    for name in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            if name.isdigit() and marker in Path(f"/proc/{name}/environ").read_bytes().split(b"\0"):
                if Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                    found.append(int(name))
    return found


# ---- offers -------------------------------------------------------------------------------


def test_search_applies_vast_filters(provider: LocalProvider) -> None:
    cheap_us_4090 = provider.search_offers(
        OfferQuery(gpu_name="RTX 4090", region="US", max_price_per_hour=Decimal("0.35"))
    )
    assert [(o.host_id, o.price_per_hour) for o in cheap_us_4090] == [
        ("10008", Decimal("0.29")),
        ("10010", Decimal("0.31")),
    ]
    assert all(o.provider == "local" and o.gpu_ram_gb == 24.0 for o in cheap_us_4090)

    excluded = provider.search_offers(
        OfferQuery(gpu_name="RTX 4090", region="US", exclude_host_ids=("10008", "10010"))
    )
    assert [o.host_id for o in excluded] == ["10001"]

    reliable = provider.search_offers(OfferQuery(min_reliability=0.99))
    assert {o.host_id for o in reliable} == {"10001", "10002"}

    cpu_only = provider.search_offers(OfferQuery(num_gpus=0))
    assert [(o.gpu_name, o.host_id) for o in cpu_only] == [
        ("CPU", "10013"),
        ("CPU", "10012"),
    ]  # cheapest first

    big_disk = provider.search_offers(OfferQuery(min_disk_gb=500, limit=5))
    assert [o.host_id for o in big_disk] == ["10006"]

    bids = provider.search_offers(OfferQuery(gpu_name="RTX 4090", region="DE", interruptible=True))
    assert [(o.host_id, o.raw["is_bid"], o.raw["min_bid"]) for o in bids] == [("10002", True, 0.19)]


def test_full_host_disappears_and_renting_it_is_a_capacity_error(
    market: MarketplaceHandle, provider: LocalProvider, ssh_key: tuple[Path, str]
) -> None:
    market.control.set_host("h100-us", capacity=1)
    try:
        offer = _offer(provider, "10006", gpu_name="H100 SXM")
        provider.create(offer, _launch(ssh_key, "cap-1"))
        assert provider.search_offers(OfferQuery(gpu_name="H100 SXM")) == []
        with pytest.raises(CapacityError, match="not available"):
            provider.create(offer, _launch(ssh_key, "cap-2"))
    finally:
        market.control.set_host("h100-us", capacity=3)


# ---- a machine's whole life ----------------------------------------------------------------


def test_machine_lifecycle_over_real_ssh(
    market: MarketplaceHandle, provider: LocalProvider, ssh_key: tuple[Path, str]
) -> None:
    onstart = 'echo "$GREETING in $(pwd)" > onstart-ran.txt'
    created = provider.create(
        _offer(provider, FAST_HOST, gpu_name="RTX 4090"), _launch(ssh_key, "life-1", onstart)
    )
    assert created.status == STATUS_CREATING
    inst = _running(provider, created.instance_id)
    assert (inst.host_id, inst.label, inst.price_per_hour) == (FAST_HOST, "life-1", Decimal("0.42"))
    assert inst.ssh_host_key and inst.ssh_host_key.startswith("ssh-ed25519 ")
    info = market.control.instance(inst.instance_id)
    workspace, machine_dir = info["workspace"], Path(info["machine_dir"])

    market.control.set_gpu_util(inst.instance_id, 87.5)
    assert provider.get(inst.instance_id).gpu_util == 87.5
    # The pinned host key is the one sshd presents (RejectPolicy inside machines.ssh).
    with wait_for_ssh(_target(inst), ssh_key[0], time.monotonic() + 10) as session:
        result = session.run(
            'cd "$DUMONT_WORKSPACE" && pwd && cat onstart-ran.txt && echo "$DUMONT_MACHINE_ID" '
            '&& cat "$DUMONT_GPU_UTIL_FILE" && echo "$HOME"',
            check=True,
        )
        assert result.stdout.splitlines() == [
            workspace,
            f"hello from env in {workspace}",  # onstart ran with the launch's env, in the workspace
            inst.instance_id,
            "87.5",
            str(machine_dir / "home"),
        ]
        session.run('echo kept > "$DUMONT_WORKSPACE/data.txt"', check=True)

    provider.stop(inst.instance_id)
    stopped = provider.get(inst.instance_id)
    assert stopped.status == STATUS_STOPPED and not stopped.ssh_ready
    assert _refuses(inst.ssh_port)
    assert (machine_dir / "workspace" / "data.txt").read_text() == "kept\n"  # the disk survives a stop

    provider.start(inst.instance_id)
    again = _running(provider, inst.instance_id)
    assert again.ssh_host_key == inst.ssh_host_key  # same machine, same host key
    with wait_for_ssh(_target(again), ssh_key[0], time.monotonic() + 10) as session:
        assert session.run('cat "$DUMONT_WORKSPACE/data.txt"', check=True).stdout == "kept\n"
        # A process that outlives its session, as an agent or a training job would.
        session.run("setsid sleep 600 </dev/null >/dev/null 2>&1 &", check=True)
    wait_for(lambda: _machine_processes(inst.instance_id), what="the background process")

    provider.destroy(inst.instance_id)
    provider.destroy(inst.instance_id)  # already gone: still a success
    assert provider.get(inst.instance_id).status == STATUS_GONE
    assert provider.list("life-") == []
    # Nothing of the machine is left on this host: no process, no listener, no directory.
    assert _machine_processes(inst.instance_id) == []
    assert processes_under(machine_dir) == []
    assert _refuses(again.ssh_port)
    assert not machine_dir.exists()

    billing = market.control.instance(inst.instance_id)["billing"]
    assert billing["gpu_seconds"] > 0 and billing["storage_seconds"] >= billing["gpu_seconds"]
    assert billing["gpu_usd"] == pytest.approx(0.42 * billing["gpu_seconds"] / 3600, rel=1e-3)
    frozen = market.control.instance(inst.instance_id)["billing"]
    assert frozen == billing  # a destroyed machine costs nothing more


def test_list_by_label_prefix_and_registry(market: MarketplaceHandle, ssh_key: tuple[Path, str]) -> None:
    provider = get_provider("local", base_url=market.url, backoff_initial=0.05)
    assert isinstance(provider, LocalProvider)
    offer = _offer(provider, "10012", num_gpus=0)
    a = provider.create(offer, _launch(ssh_key, "lp-a-1"))
    b = provider.create(offer, _launch(ssh_key, "lp-b-1"))
    try:
        assert [i.instance_id for i in provider.list("lp-a-")] == [a.instance_id]
        assert {i.instance_id for i in provider.list("lp-")} == {a.instance_id, b.instance_id}
    finally:
        market.control.destroy_all()


def test_crash_makes_a_running_machine_vanish(
    market: MarketplaceHandle, provider: LocalProvider, ssh_key: tuple[Path, str]
) -> None:
    created = provider.create(_offer(provider, FAST_HOST, gpu_name="RTX 4090"), _launch(ssh_key, "crash-1"))
    inst = _running(provider, created.instance_id)
    with wait_for_ssh(_target(inst), ssh_key[0], time.monotonic() + 10) as session:
        session.run("setsid sleep 600 </dev/null >/dev/null 2>&1 &", check=True)
    market.control.crash(inst.instance_id)
    crashed = provider.get(inst.instance_id)
    assert (crashed.status, crashed.raw_status, crashed.ssh_ready) == (STATUS_FAILED, "offline", False)
    assert _refuses(inst.ssh_port)
    assert _machine_processes(inst.instance_id) == []


# ---- hosts that never deliver ---------------------------------------------------------------


def test_stuck_exited_and_silent_hosts(provider: LocalProvider, ssh_key: tuple[Path, str]) -> None:
    stuck = provider.create(_offer(provider, "10008", gpu_name="RTX 4090"), _launch(ssh_key, "bad-stuck"))
    exits = provider.create(_offer(provider, "10009", gpu_name="RTX 3090"), _launch(ssh_key, "bad-exits"))
    silent = provider.create(_offer(provider, "10010", gpu_name="RTX 4090"), _launch(ssh_key, "bad-silent"))

    wait_for(lambda: provider.get(exits.instance_id).status == STATUS_FAILED, what="exited")
    assert provider.get(exits.instance_id).raw_status == "exited"
    dead = _running(provider, silent.instance_id)  # reports running, with an SSH port...
    with pytest.raises(SSHConnectError):  # ...that accepts and never says a word
        connect(_target(dead), ssh_key[0], connect_timeout=0.5)
    still = provider.get(stuck.instance_id)  # every other host booted meanwhile; this one never will
    assert (still.status, still.raw_status) == (STATUS_CREATING, "loading")


# ---- the API misbehaving ------------------------------------------------------------------


def test_429_is_vast_plain_text(market: MarketplaceHandle, provider: LocalProvider) -> None:
    market.control.set_faults(next=[429])
    response = requests.get(market.base_url + "instances/", headers={"Authorization": "Bearer x"}, timeout=5)
    assert (response.status_code, response.text) == (429, "API requests too frequent")
    assert response.headers["Content-Type"].startswith("text/plain")
    assert "Retry-After" not in response.headers


def test_injected_faults_are_retried(market: MarketplaceHandle, provider: LocalProvider) -> None:
    before = market.control.state()["api_calls"].get("GET /instances/", 0)
    market.control.set_faults(next=[429, 500, 429])
    assert provider.list() == []
    state = market.control.state()
    assert state["faults_served"][-3:] == [
        "429 GET /instances/",
        "500 GET /instances/",
        "429 GET /instances/",
    ]
    assert state["api_calls"]["GET /instances/"] == before + 4  # three refused, the fourth answered


def test_rate_limit_gap_is_ridden_out(market: MarketplaceHandle, provider: LocalProvider) -> None:
    market.control.set_faults(min_gap_s=0.25)
    for _ in range(3):  # back-to-back calls hit the gap; backoff gets through
        provider.search_offers(OfferQuery(num_gpus=0))
    assert any(f == "429 POST /bundles/" for f in market.control.state()["faults_served"])


@pytest.mark.parametrize("fault", ["slow", "drop"])
def test_create_whose_answer_is_lost_rents_exactly_once(
    market: MarketplaceHandle, ssh_key: tuple[Path, str], provider: LocalProvider, fault: str
) -> None:
    impatient = market.provider(timeout=0.5)
    market.control.set_faults(next=[{"fault": fault, "match": "PUT /asks/"}], slow_seconds=1.5)
    before = market.control.state()["api_calls"].get("PUT /asks/", 0)
    label = f"once-{fault}"
    inst = impatient.create(_offer(provider, "10013", num_gpus=0), _launch(ssh_key, label))
    assert inst.label == label
    rentals = [i for i in market.control.state()["instances"] if i["label"] == label]
    assert [str(r["id"]) for r in rentals] == [inst.instance_id]
    assert market.control.state()["api_calls"]["PUT /asks/"] == before + 1


# ---- service ------------------------------------------------------------------------------


def test_restart_keeps_the_world_and_brings_machines_back(tmp_path: Path, ssh_key: tuple[Path, str]) -> None:
    with running_marketplace(tmp_path, time_scale=0.01) as first:
        provider = first.provider()
        created = provider.create(
            _offer(provider, FAST_HOST, gpu_name="RTX 4090"), _launch(ssh_key, "restart-1")
        )
        inst = _running(provider, created.instance_id)
        first.process.terminate()  # SIGTERM: the server stops every sshd, keeps the world on disk
        first.process.wait(20)
        assert _refuses(inst.ssh_port)
    with running_marketplace(tmp_path, time_scale=0.01) as second:
        back = _running(second.provider(), inst.instance_id)
        assert (back.label, back.ssh_host_key) == ("restart-1", inst.ssh_host_key)
        with wait_for_ssh(_target(back), ssh_key[0], time.monotonic() + 10) as session:
            assert session.run("echo $DUMONT_MACHINE_ID", check=True).stdout.strip() == inst.instance_id
    assert processes_under(tmp_path) == []


def test_cli_status_and_set_host(market: MarketplaceHandle, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        marketplace_main(
            ["set-host", "slow-3090-br", "--url", market.url, "--boot-median", "5", "--boot-sigma", "0"]
        )
        == 0
    )
    try:
        host = next(h for h in market.control.hosts() if h["name"] == "slow-3090-br")
        assert (host["boot_median"], host["boot_sigma"]) == (5.0, 0.0)
        assert marketplace_main(["status", "--url", market.url]) == 0
        out = capsys.readouterr().out
        assert "slow-3090-br" in out and "stuck-loading-4090" in out
        assert marketplace_main(["set-host", "no-such-host", "--url", market.url, "--capacity", "1"]) == 1
    finally:
        market.control.set_host("slow-3090-br", boot_median=75, boot_sigma=0.3)
