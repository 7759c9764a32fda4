"""The RunPod adapter against recorded GraphQL responses, served by a tiny local HTTP stub.

The stub parses every request with graphql-core, so each query we send must be valid GraphQL,
and tests assert on the parsed arguments (what RunPod would receive), not on our strings.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import graphql
import pytest
from graphql.utilities import value_from_ast_untyped

from machines.providers.base import (
    STATUS_CREATING,
    STATUS_GONE,
    STATUS_RUNNING,
    STATUS_STOPPED,
    AuthError,
    CapacityError,
    FatalError,
    LaunchRequest,
    OfferQuery,
    RetryableError,
    get_provider,
)
from machines.providers.runpod import RunPodProvider

FIXTURES = Path(__file__).parent / "fixtures" / "runpod"
API_KEY = "rpa_TESTKEY0123456789abcdef"


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


class Request:
    def __init__(self, path: str, headers: dict[str, str], query: str):
        self.path = path
        self.headers = headers
        self.query = query
        operation = graphql.parse(query).definitions[0]
        field = operation.selection_set.selections[0]
        self.kind = operation.operation.value  # "query" / "mutation"
        self.field = field.name.value
        self.args = {a.name.value: value_from_ast_untyped(a.value) for a in field.arguments}
        self.input = self.args.get("input") or {}


class Stub:
    """Answers each GraphQL root field from a script of (status, body) replies; the last one repeats."""

    def __init__(self) -> None:
        self.replies: dict[str, list[tuple[int, Any]]] = {}
        self.requests: list[Request] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                request = Request(self.path, dict(self.headers), body["query"])
                stub.requests.append(request)
                script = stub.replies.get(request.field) or [(500, {"errors": [{"message": "unscripted"}]})]
                status, reply = script.pop(0) if len(script) > 1 else script[0]
                data = reply.encode() if isinstance(reply, str) else json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/graphql"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True)
        self.thread.start()

    def reply(self, field: str, *replies: tuple[int, Any] | str) -> None:
        """Each reply: a fixture name (HTTP 200) or (status, body)."""
        self.replies[field] = [(200, fixture(r)) if isinstance(r, str) else r for r in replies]

    def calls(self, field: str) -> list[Request]:
        return [r for r in self.requests if r.field == field]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub() -> Iterator[Stub]:
    server = Stub()
    yield server
    server.close()


@pytest.fixture
def runpod(stub: Stub) -> RunPodProvider:
    return RunPodProvider(API_KEY, stub.url, timeout=5, backoff_initial=0.01, backoff_max=0.05)


def launch(**overrides: Any) -> LaunchRequest:
    values: dict[str, Any] = {
        "label": "dumont-i42-r1-m3",
        "image": "runpod/pytorch:2.4.0-py3.11-cuda12.4.1-devel-ubuntu22.04",
        "disk_gb": 50,
        "ssh_public_keys": ("ssh-ed25519 AAAAcontrol dumont", "ssh-rsa AAAAowner alice@laptop"),
        "env": {"DUMONT_INSTANCE": "42"},
    }
    values.update(overrides)
    return LaunchRequest(**values)


def offer_for(runpod: RunPodProvider, stub: Stub, offer_id: str, **query: Any):
    stub.reply("gpuTypes", "gpu_types.json")
    return next(o for o in runpod.search_offers(OfferQuery(**query)) if o.offer_id == offer_id)


# ---- offers -------------------------------------------------------------------------------


def test_search_lists_one_offer_per_cloud_in_stock_cheapest_first(runpod: RunPodProvider, stub: Stub) -> None:
    stub.reply("gpuTypes", "gpu_types.json")
    offers = runpod.search_offers(OfferQuery())

    assert [(o.offer_id, o.price_per_hour) for o in offers] == [
        ("COMMUNITY:NVIDIA RTX A4000", Decimal("0.17")),
        ("SECURE:NVIDIA RTX A4000", Decimal("0.32")),
        ("COMMUNITY:NVIDIA GeForce RTX 4090", Decimal("0.34")),
        ("SECURE:NVIDIA GeForce RTX 4090", Decimal("0.69")),
        ("SECURE:NVIDIA A100 80GB PCIe", Decimal("1.64")),  # not in the community cloud
    ]  # the H100 has no stock: not offered at all
    a100 = offers[-1]
    assert (a100.provider, a100.gpu_name, a100.num_gpus, a100.gpu_ram_gb) == ("runpod", "A100 PCIe", 1, 80.0)
    assert a100.reliability is None
    request = stub.requests[0]
    assert request.path == "/graphql"  # the key is not in the URL
    assert request.headers["Authorization"] == f"Bearer {API_KEY}"


def test_search_filters_by_gpu_count_name_price_and_excluded_pools(
    runpod: RunPodProvider, stub: Stub
) -> None:
    stub.reply("gpuTypes", "gpu_types.json")
    query = OfferQuery(gpu_name="RTX 4090", num_gpus=2, max_price_per_hour=Decimal("1.00"), region="US")
    offers = runpod.search_offers(query)

    assert [(o.offer_id, o.num_gpus, o.price_per_hour, o.region) for o in offers] == [
        ("COMMUNITY:NVIDIA GeForce RTX 4090", 2, Decimal("0.68"), "US")  # secure x2 = 1.38 is too dear
    ]
    lowest = stub.requests[0].query
    assert 'lowestPrice(input: {gpuCount: 2, countryCode: "US"})' in lowest

    assert runpod.search_offers(OfferQuery(num_gpus=2, gpu_name="RTX A4000")) == []  # max 1 per pod
    excluded = runpod.search_offers(OfferQuery(exclude_host_ids=("COMMUNITY:NVIDIA RTX A4000",), limit=2))
    assert [o.offer_id for o in excluded] == ["SECURE:NVIDIA RTX A4000", "COMMUNITY:NVIDIA GeForce RTX 4090"]


def test_interruptible_search_uses_spot_prices(runpod: RunPodProvider, stub: Stub) -> None:
    stub.reply("gpuTypes", "gpu_types.json")
    offers = runpod.search_offers(OfferQuery(gpu_name="NVIDIA GeForce RTX 4090", interruptible=True))
    assert [(o.offer_id, o.price_per_hour) for o in offers] == [
        ("COMMUNITY:NVIDIA GeForce RTX 4090", Decimal("0.2")),
        ("SECURE:NVIDIA GeForce RTX 4090", Decimal("0.35")),
    ]


# ---- create -------------------------------------------------------------------------------


def test_create_deploys_on_demand_with_our_keys_label_and_ssh_port(
    runpod: RunPodProvider, stub: Stub
) -> None:
    offer = offer_for(runpod, stub, "COMMUNITY:NVIDIA GeForce RTX 4090")
    stub.reply("podFindAndDeployOnDemand", "pod_deploy_on_demand.json")
    tricky = 'x", gpuCount: 8, name: "pwned'  # must stay one string value
    instance = runpod.create(offer, launch(env={"DUMONT_INSTANCE": "42", "NOTE": tricky}))

    sent = stub.calls("podFindAndDeployOnDemand")[0]
    assert sent.kind == "mutation"
    assert sent.input == {
        "name": "dumont-i42-r1-m3",
        "imageName": "runpod/pytorch:2.4.0-py3.11-cuda12.4.1-devel-ubuntu22.04",
        "cloudType": "COMMUNITY",
        "gpuTypeId": "NVIDIA GeForce RTX 4090",
        "gpuCount": 1,
        "supportPublicIp": True,
        "startSsh": True,
        "containerDiskInGb": 20,
        "volumeInGb": 50,
        "volumeMountPath": "/workspace",
        "ports": "22/tcp",
        "env": [
            {"key": "DUMONT_INSTANCE", "value": "42"},
            {"key": "NOTE", "value": tricky},
            {"key": "PUBLIC_KEY", "value": "ssh-ed25519 AAAAcontrol dumont\nssh-rsa AAAAowner alice@laptop"},
        ],
    }
    assert "cloudType: COMMUNITY" in sent.query  # an enum, not a string
    assert (instance.instance_id, instance.status, instance.label) == (
        "ljf4phxhq229f1",
        STATUS_CREATING,
        "dumont-i42-r1-m3",
    )
    assert (instance.host_id, instance.price_per_hour, instance.ssh_ready) == (
        "s8l5ax6s4nu1",
        Decimal("0.34"),
        False,
    )


def test_create_interruptible_rents_with_a_bid_per_gpu(runpod: RunPodProvider, stub: Stub) -> None:
    offer = offer_for(runpod, stub, "SECURE:NVIDIA GeForce RTX 4090", num_gpus=2, interruptible=True)
    stub.reply("podRentInterruptable", "pod_rent_interruptable.json")
    instance = runpod.create(offer, launch(interruptible=True))

    sent = stub.calls("podRentInterruptable")[0].input
    assert (sent["cloudType"], sent["gpuCount"], sent["bidPerGpu"]) == ("SECURE", 2, 0.35)
    assert not stub.calls("podFindAndDeployOnDemand")
    assert instance.instance_id == "2x0s9kqq7d1vre"


def test_no_capacity_is_a_capacity_error_sent_once(runpod: RunPodProvider, stub: Stub) -> None:
    offer = offer_for(runpod, stub, "SECURE:NVIDIA A100 80GB PCIe")
    stub.reply("podFindAndDeployOnDemand", "error_no_capacity.json")
    with pytest.raises(CapacityError, match="no longer any instances available"):
        runpod.create(offer, launch())
    assert len(stub.calls("podFindAndDeployOnDemand")) == 1


def test_a_create_whose_answer_was_lost_is_found_by_label_not_sent_twice(
    runpod: RunPodProvider, stub: Stub
) -> None:
    offer = offer_for(runpod, stub, "COMMUNITY:NVIDIA GeForce RTX 4090")
    stub.reply("podFindAndDeployOnDemand", (502, "<html>Bad Gateway</html>"))
    stub.reply("myself", "myself_pods.json")
    instance = runpod.create(offer, launch(label="dumont-i42-r1-m3"))
    assert (instance.instance_id, instance.status) == ("ljf4phxhq229f1", STATUS_RUNNING)
    assert len(stub.calls("podFindAndDeployOnDemand")) == 1

    with pytest.raises(RetryableError):  # nothing by that label: the caller may try again
        runpod.create(offer, launch(label="dumont-i99-r1-m1"))
    assert len(stub.calls("podFindAndDeployOnDemand")) == 2


def test_create_refuses_onstart_and_foreign_offer_ids(runpod: RunPodProvider, stub: Stub) -> None:
    offer = offer_for(runpod, stub, "COMMUNITY:NVIDIA GeForce RTX 4090")
    with pytest.raises(FatalError, match="onstart"):
        runpod.create(offer, launch(onstart="echo hi"))
    with pytest.raises(FatalError, match="not a RunPod offer id"):
        runpod.create(offer.__class__(**{**offer.__dict__, "offer_id": "12345"}), launch())
    assert not stub.calls("podFindAndDeployOnDemand")


# ---- state --------------------------------------------------------------------------------


def test_a_running_pod_has_its_public_ssh_mapping_gpu_util_and_start_time(
    runpod: RunPodProvider, stub: Stub
) -> None:
    stub.reply("pod", "pod_running.json")
    before = time.time()
    pod = runpod.get("ljf4phxhq229f1")

    assert stub.calls("pod")[0].input == {"podId": "ljf4phxhq229f1"}
    assert (pod.status, pod.raw_status, pod.ssh_ready) == (STATUS_RUNNING, "RUNNING", True)
    assert (pod.ssh_host, pod.ssh_port, pod.ssh_user) == ("213.173.108.12", 17389, "root")
    assert pod.gpu_util == 40.0
    assert before - 87 - 1 <= pod.started_at <= time.time() - 87 + 1
    assert (pod.host_id, pod.label, pod.price_per_hour) == (
        "s8l5ax6s4nu1",
        "dumont-i42-r1-m3",
        Decimal("0.68"),
    )


@pytest.mark.parametrize(
    ("reply", "status", "ssh_ready"),
    [
        ("pod_starting.json", STATUS_CREATING, False),
        ("pod_running_no_public_ip.json", STATUS_RUNNING, False),  # RunPod's proxy is not direct SSH
        ("pod_exited.json", STATUS_STOPPED, False),
        ("pod_null.json", STATUS_GONE, False),
        ((200, fixture("error_pod_not_found.json")), STATUS_GONE, False),
    ],
)
def test_pod_states_are_normalised(
    runpod: RunPodProvider, stub: Stub, reply, status: str, ssh_ready: bool
) -> None:
    stub.reply("pod", reply)
    pod = runpod.get("ljf4phxhq229f1")
    assert (pod.status, pod.ssh_ready) == (status, ssh_ready)


def test_list_keeps_only_our_label_prefix(runpod: RunPodProvider, stub: Stub) -> None:
    stub.reply("myself", "myself_pods.json")
    pods = runpod.list("dumont-")
    assert [(p.instance_id, p.status) for p in pods] == [
        ("ljf4phxhq229f1", STATUS_RUNNING),
        ("2x0s9kqq7d1vre", STATUS_STOPPED),
    ]
    assert len(runpod.list()) == 3


# ---- lifecycle ----------------------------------------------------------------------------


def test_stop_and_start_resume_with_the_pods_gpu_count(runpod: RunPodProvider, stub: Stub) -> None:
    stub.reply("podStop", "pod_stop.json")
    stub.reply("pod", "pod_exited.json")
    stub.reply("podResume", "pod_resume.json")
    runpod.stop("ljf4phxhq229f1")
    runpod.start("ljf4phxhq229f1")
    assert stub.calls("podStop")[0].input == {"podId": "ljf4phxhq229f1"}
    assert stub.calls("podResume")[0].input == {"podId": "ljf4phxhq229f1", "gpuCount": 2}


def test_a_resume_without_gpus_is_stopped_again_and_reported(runpod: RunPodProvider, stub: Stub) -> None:
    stub.reply("pod", "pod_exited.json")
    stub.reply("podResume", "pod_resume_zero_gpus.json")
    stub.reply("podStop", "pod_stop.json")
    with pytest.raises(CapacityError, match="0 of 2 GPUs"):
        runpod.start("ljf4phxhq229f1")
    assert len(stub.calls("podStop")) == 1  # not left running (and billing) without a GPU


def test_a_resume_refused_for_lack_of_gpus_is_a_capacity_error(runpod: RunPodProvider, stub: Stub) -> None:
    stub.reply("pod", "pod_exited.json")
    stub.reply("podResume", "error_resume_not_enough_gpus.json")
    with pytest.raises(CapacityError):
        runpod.start("ljf4phxhq229f1")


def test_destroy_terminates_and_an_already_gone_pod_is_success(runpod: RunPodProvider, stub: Stub) -> None:
    stub.reply("podTerminate", "pod_terminate.json", "error_pod_not_found.json", "error_validation.json")
    runpod.destroy("ljf4phxhq229f1")
    runpod.destroy("ljf4phxhq229f1")
    assert [c.input for c in stub.calls("podTerminate")] == [{"podId": "ljf4phxhq229f1"}] * 2
    with pytest.raises(FatalError):  # any other refusal is surfaced
        runpod.destroy("ljf4phxhq229f1")


# ---- errors, retries, secrecy -------------------------------------------------------------


def test_rate_limits_and_server_errors_are_retried_then_succeed(runpod: RunPodProvider, stub: Stub) -> None:
    stub.reply("pod", (429, "Too Many Requests"), (503, "unavailable"), "pod_running.json")
    assert runpod.get("ljf4phxhq229f1").status == STATUS_RUNNING
    assert len(stub.calls("pod")) == 3


def test_retries_are_bounded(runpod: RunPodProvider, stub: Stub) -> None:
    stub.reply("myself", (502, "Bad Gateway"))
    with pytest.raises(RetryableError) as failed:
        runpod.list()
    assert failed.value.status_code == 502
    assert len(stub.calls("myself")) == 4


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        ((401, fixture("error_unauthenticated.json")), AuthError),
        ((200, fixture("error_unauthenticated.json")), AuthError),
        ((400, fixture("error_validation.json")), FatalError),
        ((200, {"data": None}), FatalError),
    ],
)
def test_refusals_map_to_typed_errors_without_retrying(
    runpod: RunPodProvider, stub: Stub, reply, error
) -> None:
    stub.reply("gpuTypes", reply)
    with pytest.raises(error):
        runpod.search_offers(OfferQuery())
    assert len(stub.calls("gpuTypes")) == 1


def test_an_unreachable_api_is_retryable(stub: Stub) -> None:
    url = stub.url
    stub.close()  # nothing listens there any more
    provider = RunPodProvider(API_KEY, url, timeout=2, max_attempts=2, backoff_initial=0.01)
    with pytest.raises(RetryableError):
        provider.list()


def test_the_api_key_never_shows(stub: Stub, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    provider = get_provider(
        "runpod", api_key=API_KEY, base_url=stub.url, max_attempts=2, backoff_initial=0.01
    )
    assert isinstance(provider, RunPodProvider)
    echo = {"errors": [{"message": f"Invalid api key {API_KEY}", "extensions": {"code": "UNAUTHENTICATED"}}]}
    stub.reply("gpuTypes", (200, echo))
    stub.reply("myself", (503, f"down for {API_KEY}"))
    stub.reply("pod", (500, {"errors": [{"message": f"boom {API_KEY}"}]}))
    failures = []
    for call in (lambda: provider.search_offers(OfferQuery()), provider.list, lambda: provider.get("p1")):
        with pytest.raises(Exception) as failed:
            call()
        failures.append(failed.value)
    assert [type(f) for f in failures] == [AuthError, RetryableError, RetryableError]
    shown = " ".join([repr(provider), str(provider.__dict__.get("_session")), caplog.text])
    shown += " ".join(f"{f!s} {f!r}" for f in failures)
    assert API_KEY not in shown
    assert "***" in str(failures[0])


def test_empty_key_is_refused() -> None:
    with pytest.raises(AuthError):
        RunPodProvider("")
