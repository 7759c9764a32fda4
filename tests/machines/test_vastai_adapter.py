"""VastAIProvider against a scripted local HTTP stub that answers like vast.ai (recorded shapes).

The stub is real HTTP on a loopback port, so timeouts, dropped connections and plain-text 429s go
through requests exactly as they would against console.vast.ai.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import subprocess
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from machines.providers.base import (
    STATUS_CREATING,
    STATUS_FAILED,
    STATUS_GONE,
    STATUS_RUNNING,
    STATUS_STOPPED,
    AuthError,
    CapacityError,
    FatalError,
    LaunchRequest,
    Offer,
    OfferQuery,
    ProviderError,
    RetryableError,
)
from machines.providers.vastai import ONSTART_LIMIT_BYTES, VastAIProvider, build_onstart, normalise_status

API_KEY = "vk-0123456789abcdef-secret"
KEY_A = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl control-plane"
KEY_B = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHHxIrk4ZxUe5Yf1lXvQXjS2cS8RBeH8yWuGxQH1f8Xz owner's laptop"

# Trimmed from real /bundles/ and /instances/ answers (field names and units as vast sends them).
OFFER = {
    "id": 12981263,
    "ask_contract_id": 12981263,
    "machine_id": 7421,
    "host_id": 91234,
    "gpu_name": "RTX 4090",
    "num_gpus": 1,
    "gpu_ram": 24564,
    "cpu_ram": 64306,
    "disk_space": 412.5,
    "dph_total": 0.3466,
    "min_bid": 0.1876,
    "reliability": 0.9971,
    "reliability2": 0.9971,
    "verification": "verified",
    "inet_down": 822.4,
    "geolocation": "California, US",
    "direct_port_count": 100,
    "cuda_max_good": 12.4,
    "storage_cost": 0.15,
    "rentable": True,
    "rented": False,
}
INSTANCE = {
    "id": 8123456,
    "machine_id": 7421,
    "label": "dumont-42-a1",
    "actual_status": "running",
    "intended_status": "running",
    "cur_state": "running",
    "status_msg": "success, running vastai/base-image_cuda-12.4/ssh",
    "ssh_host": "ssh5.vast.ai",
    "ssh_port": 23456,
    "public_ipaddr": "203.0.113.7\n",
    "ports": {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": "41022"}]},
    "gpu_util": 37.0,
    "dph_total": 0.3466,
    "start_date": 1764412345.123,
}


@dataclasses.dataclass
class Reply:
    status: int = 200
    json: Any = None
    text: str | None = None  # plain-text body instead of JSON
    delay: float = 0.0  # seconds before answering (after the request was recorded)
    drop: bool = False  # close the connection without answering


@dataclasses.dataclass
class Seen:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: Any


class VastStub:
    """Routes (method, path) -> replies served in order (the last one repeats)."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], list[Reply | Callable[[Seen], Reply]]] = {}
        self.seen: list[Seen] = []
        self.lock = threading.Lock()

    def on(self, method: str, path: str, *replies: Reply | Callable[[Seen], Reply]) -> None:
        self.routes[(method, path)] = list(replies)

    def calls(self, method: str, path: str) -> list[Seen]:
        return [s for s in self.seen if (s.method, s.path) == (method, path)]

    def reply_for(self, seen: Seen) -> Reply:
        with self.lock:
            self.seen.append(seen)
            replies = self.routes.get((seen.method, seen.path))
            if not replies:
                return Reply(404, text="no route in stub")
            reply = replies.pop(0) if len(replies) > 1 else replies[0]
        return reply(seen) if callable(reply) else reply


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _any(self) -> None:
        path, _, query = self.path.partition("?")
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        seen = Seen(
            self.command,
            path.removeprefix("/api/v0"),
            query,
            dict(self.headers),
            json.loads(raw) if raw else None,
        )
        reply = self.server.stub.reply_for(seen)  # type: ignore[attr-defined]
        if reply.delay:
            time.sleep(reply.delay)
        if reply.drop:
            self.close_connection = True
            return
        payload = (reply.text if reply.text is not None else json.dumps(reply.json)).encode()
        self.send_response(reply.status)
        self.send_header("Content-Type", "text/plain" if reply.text is not None else "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = _any

    def log_message(self, *args: Any) -> None:
        pass


class _StubServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that timed out hangs up before the late answer: expected here


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadingHTTPServer]:
    httpd = _StubServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def stub(server: ThreadingHTTPServer) -> VastStub:
    server.stub = VastStub()  # type: ignore[attr-defined]
    return server.stub  # type: ignore[attr-defined]


@pytest.fixture
def vast(server: ThreadingHTTPServer) -> VastAIProvider:
    return VastAIProvider(
        API_KEY,
        base_url=f"http://127.0.0.1:{server.server_address[1]}/api/v0/",
        timeout=2,
        max_attempts=4,
        backoff_initial=0.01,
        backoff_max=0.05,
    )


def _offer(**raw: Any) -> Offer:
    data = {**OFFER, **raw}
    return VastAIProvider("k")._offer(data)


def _launch(**changes: Any) -> LaunchRequest:
    base = LaunchRequest(
        label="dumont-42-a1",
        image="vastai/base-image:cuda-12.4",
        disk_gb=40,
        ssh_public_keys=(KEY_A, KEY_B),
        env={"DUMONT_INSTANCE": "42"},
        onstart='echo started > "$HOME/onstart-ran"',
    )
    return dataclasses.replace(base, **changes)


# ---- offers -------------------------------------------------------------------------------


def test_search_sends_vast_filter_and_maps_offers(stub: VastStub, vast: VastAIProvider) -> None:
    stub.on("POST", "/bundles/", Reply(json={"offers": [OFFER]}))
    offers = vast.search_offers(
        OfferQuery(
            gpu_name="RTX 4090",
            num_gpus=1,
            max_price_per_hour=Decimal("0.50"),
            region="US",
            min_disk_gb=100,
            min_reliability=0.95,
            exclude_host_ids=("7000", "7001"),
            limit=20,
        )
    )
    (call,) = stub.calls("POST", "/bundles/")
    assert call.headers["Authorization"] == f"Bearer {API_KEY}"
    assert call.body == {
        "verified": {"eq": True},
        "rentable": {"eq": True},
        "rented": {"eq": False},
        "gpu_name": {"eq": "RTX 4090"},
        "num_gpus": {"eq": 1},
        "dph_total": {"lte": 0.5},
        "geolocation": {"in": ["US"]},
        "disk_space": {"gte": 100},
        "reliability": {"gte": 0.95},
        "machine_id": {"notin": [7000, 7001]},
        "order": [["dph_total", "asc"]],
        "type": "on-demand",
        "limit": 20,
    }
    (offer,) = offers
    assert offer.offer_id == "12981263"
    assert offer.host_id == "7421"  # machine_id, not the host account: our reliability key
    assert offer.gpu_ram_gb == pytest.approx(24.0, abs=0.05)  # 24564 MB
    assert offer.price_per_hour == Decimal("0.3466")
    assert offer.reliability == pytest.approx(0.9971)
    assert (offer.region, offer.disk_gb, offer.inet_down_mbps) == ("California, US", 412.5, 822.4)
    assert offer.provider == "vastai"


def test_interruptible_search_and_create_bid_min_bid(stub: VastStub, vast: VastAIProvider) -> None:
    stub.on("POST", "/bundles/", Reply(json={"offers": [OFFER]}))
    stub.on("PUT", "/asks/12981263/", Reply(json={"success": True, "new_contract": 8123456}))
    (offer,) = vast.search_offers(OfferQuery(interruptible=True))
    assert stub.calls("POST", "/bundles/")[0].body["type"] == "bid"
    vast.create(offer, _launch(interruptible=True))
    assert stub.calls("PUT", "/asks/12981263/")[0].body["price"] == pytest.approx(0.1876)


# ---- create -------------------------------------------------------------------------------


def test_create_sends_vast_body_and_returns_contract(stub: VastStub, vast: VastAIProvider) -> None:
    stub.on("PUT", "/asks/12981263/", Reply(json={"success": True, "new_contract": 8123456}))
    created = vast.create(_offer(), _launch())
    (call,) = stub.calls("PUT", "/asks/12981263/")
    body = call.body
    assert body == {
        "client_id": "me",
        "image": "vastai/base-image:cuda-12.4",
        "disk": 40,
        "label": "dumont-42-a1",
        "onstart": build_onstart(_launch()),
        "runtype": "ssh_direc ssh_proxy",
        "env": {"DUMONT_INSTANCE": "42"},
        "price": None,
        "cancel_unavail": True,
    }
    assert (created.instance_id, created.status, created.label) == (
        "8123456",
        STATUS_CREATING,
        "dumont-42-a1",
    )
    assert (created.host_id, created.price_per_hour) == ("7421", Decimal("0.3466"))


def test_onstart_installs_every_key_once_then_runs_the_launch_onstart(tmp_path: Path) -> None:
    script = build_onstart(
        _launch(onstart='test -s "$HOME/.ssh/authorized_keys" && echo ok > "$HOME/onstart-ran"')
    )
    home = tmp_path / "home"
    home.mkdir()
    for _ in range(2):  # vast reruns onstart at every start: keys must not pile up
        subprocess.run(
            ["/bin/sh", "-c", script], env={"HOME": str(home), "PATH": os.environ["PATH"]}, check=True
        )
    keys = (home / ".ssh" / "authorized_keys").read_text().splitlines()
    assert keys == [KEY_A, KEY_B]
    assert (home / "onstart-ran").read_text() == "ok\n"  # ran after the keys were in place
    assert oct((home / ".ssh").stat().st_mode & 0o777) == "0o700"


def test_onstart_over_4kb_or_bad_key_is_refused_before_any_request(
    stub: VastStub, vast: VastAIProvider
) -> None:
    stub.on("PUT", "/asks/12981263/", Reply(json={"success": True, "new_contract": 1}))
    with pytest.raises(FatalError, match="4096"):
        vast.create(_offer(), _launch(onstart="echo " + "x" * ONSTART_LIMIT_BYTES))
    with pytest.raises(FatalError, match="one non-empty line"):
        vast.create(_offer(), _launch(ssh_public_keys=(KEY_A + "\nrm -rf /",)))
    assert stub.seen == []


def test_contract_returned_with_an_error_is_destroyed(stub: VastStub, vast: VastAIProvider) -> None:
    stub.on(
        "PUT",
        "/asks/12981263/",
        Reply(
            json={"success": False, "new_contract": 8123999, "error": "invalid_args", "msg": "bid too low"}
        ),
    )
    stub.on("DELETE", "/instances/8123999/", Reply(json={"success": True}))
    with pytest.raises(FatalError, match="bid too low"):
        vast.create(_offer(), _launch(interruptible=True))
    assert len(stub.calls("DELETE", "/instances/8123999/")) == 1


@pytest.mark.parametrize(
    "reply",
    [
        Reply(
            410,
            json={
                "success": False,
                "error": "no_such_ask",
                "msg": "Instance type by id 12981263 is not available.",
            },
        ),
        Reply(
            400,
            json={
                "success": False,
                "error": "invalid_args",
                "msg": "Instance type by id 12981263 is not available.",
            },
        ),
        Reply(404, text="Not Found"),
    ],
    ids=["410-no_such_ask", "400-not-available", "404-plain"],
)
def test_offer_gone_is_capacity_error_and_not_retried(
    stub: VastStub, vast: VastAIProvider, reply: Reply
) -> None:
    stub.on("PUT", "/asks/12981263/", reply)
    with pytest.raises(CapacityError):
        vast.create(_offer(), _launch())
    assert len(stub.calls("PUT", "/asks/12981263/")) == 1


def test_create_timeout_finds_the_machine_by_label_instead_of_renting_twice(
    stub: VastStub, server: ThreadingHTTPServer
) -> None:
    vast = VastAIProvider(API_KEY, base_url=f"http://127.0.0.1:{server.server_address[1]}/api/v0/", timeout=0.3,
                          max_attempts=4, backoff_initial=0.01, backoff_max=0.05)  # fmt: skip
    created: list[dict[str, Any]] = []

    def slow_create(seen: Seen) -> Reply:
        created.append({**INSTANCE, "id": 8124000, "label": seen.body["label"], "actual_status": "loading"})
        return Reply(json={"success": True, "new_contract": 8124000}, delay=1.0)  # answers after the timeout

    stub.on("PUT", "/asks/12981263/", slow_create)
    other = {**INSTANCE, "id": 8000001, "label": "dumont-42-a1-other"}  # a prefix match is not the same label
    stub.on("GET", "/instances/", lambda seen: Reply(json={"instances": [other, *created]}))
    found = vast.create(_offer(), _launch())
    assert (found.instance_id, found.label, found.status) == ("8124000", "dumont-42-a1", STATUS_CREATING)
    assert len(stub.calls("PUT", "/asks/12981263/")) == 1


def test_duplicates_under_one_label_are_destroyed_keeping_the_first(
    stub: VastStub, vast: VastAIProvider
) -> None:
    # The create was applied twice upstream (our resend raced vast's own listing): keep one machine.
    twins = [{**INSTANCE, "id": 8124003, "actual_status": "loading"}, {**INSTANCE, "id": 8124002}]
    stub.on("PUT", "/asks/12981263/", Reply(504, text="Gateway Timeout"))
    stub.on("GET", "/instances/", Reply(json={"instances": twins}))
    stub.on("DELETE", "/instances/8124003/", Reply(json={"success": True}))
    kept = vast.create(_offer(), _launch())
    assert kept.instance_id == "8124002"
    assert len(stub.calls("DELETE", "/instances/8124003/")) == 1
    assert len(stub.calls("PUT", "/asks/12981263/")) == 1


def test_create_dropped_before_reaching_vast_is_sent_again(stub: VastStub, vast: VastAIProvider) -> None:
    stub.on(
        "PUT", "/asks/12981263/", Reply(drop=True), Reply(json={"success": True, "new_contract": 8124001})
    )
    stub.on("GET", "/instances/", Reply(json={"instances": []}))
    created = vast.create(_offer(), _launch())
    assert created.instance_id == "8124001"
    assert len(stub.calls("PUT", "/asks/12981263/")) == 2
    assert len(stub.calls("GET", "/instances/")) == 1  # looked for it before renting again


def test_create_that_keeps_failing_ambiguously_raises_retryable(stub: VastStub, vast: VastAIProvider) -> None:
    stub.on("PUT", "/asks/12981263/", Reply(502, text="<html>Bad Gateway</html>"))
    stub.on("GET", "/instances/", Reply(json={"instances": []}))
    with pytest.raises(RetryableError) as info:
        vast.create(_offer(), _launch())
    assert type(info.value) is RetryableError and info.value.status_code == 502
    assert len(stub.calls("PUT", "/asks/12981263/")) == 4
    assert len(stub.calls("GET", "/instances/")) == 4  # looked by label after every unanswered create


# ---- instances ----------------------------------------------------------------------------


def test_get_maps_a_direct_instance(stub: VastStub, vast: VastAIProvider) -> None:
    stub.on("GET", "/instances/8123456/", Reply(json={"instances": INSTANCE}))
    inst = vast.get("8123456")
    assert stub.calls("GET", "/instances/8123456/")[0].query == "owner=me"
    assert (inst.status, inst.raw_status, inst.ssh_ready) == (STATUS_RUNNING, "running", True)
    assert (inst.ssh_host, inst.ssh_port, inst.ssh_user) == ("203.0.113.7", 41022, "root")
    assert inst.ssh_host_key is None  # vast does not report one: pinned at first contact
    assert (inst.host_id, inst.label, inst.gpu_util) == ("7421", "dumont-42-a1", 37.0)
    assert inst.price_per_hour == Decimal("0.3466") and inst.started_at == pytest.approx(1764412345.123)


def test_get_uses_the_ssh_proxy_without_direct_ports_and_maps_extension_fields(
    stub: VastStub, vast: VastAIProvider
) -> None:
    raw = {**INSTANCE, "ports": {}, "ssh_user": "dumont", "ssh_host_key": "ssh-ed25519 AAAAhostkey"}
    stub.on("GET", "/instances/8123456/", Reply(json={"instances": raw}))
    inst = vast.get("8123456")
    assert (inst.ssh_host, inst.ssh_port, inst.ssh_user, inst.ssh_host_key) == (
        "ssh5.vast.ai", 23456, "dumont", "ssh-ed25519 AAAAhostkey",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("actual", "expected"),
    [
        (None, STATUS_CREATING),
        ("created", STATUS_CREATING),
        ("loading", STATUS_CREATING),
        ("rebooting", STATUS_CREATING),
        ("scheduling", STATUS_CREATING),
        ("running", STATUS_RUNNING),
        ("stopped", STATUS_STOPPED),
        ("frozen", STATUS_STOPPED),
        ("exited", STATUS_FAILED),
        ("unknown", STATUS_FAILED),
        ("offline", STATUS_FAILED),
    ],
)
def test_status_normalisation(
    stub: VastStub, vast: VastAIProvider, actual: str | None, expected: str
) -> None:
    assert normalise_status(actual) == expected
    stub.on("GET", "/instances/8123456/", Reply(json={"instances": {**INSTANCE, "actual_status": actual}}))
    inst = vast.get("8123456")
    assert inst.status == expected
    assert inst.ssh_ready is (expected == STATUS_RUNNING)


@pytest.mark.parametrize(
    "reply",
    [
        Reply(json={"instances": None}),
        Reply(
            404, json={"success": False, "error": "no_such_instance", "msg": "Instance 8123456 not found."}
        ),
    ],
    ids=["null", "404"],
)
def test_get_of_a_missing_instance_is_gone(stub: VastStub, vast: VastAIProvider, reply: Reply) -> None:
    stub.on("GET", "/instances/8123456/", reply)
    assert vast.get("8123456").status == STATUS_GONE


def test_list_filters_by_label_prefix(stub: VastStub, vast: VastAIProvider) -> None:
    others = [{**INSTANCE, "id": 2, "label": None}, {**INSTANCE, "id": 3, "label": "someone-else"}]
    stub.on("GET", "/instances/", Reply(json={"instances": [INSTANCE, *others]}))
    assert [i.instance_id for i in vast.list("dumont-")] == ["8123456"]
    assert len(vast.list()) == 3


def test_stop_and_start_put_the_state(stub: VastStub, vast: VastAIProvider) -> None:
    stub.on("PUT", "/instances/8123456/", Reply(json={"success": True}))
    vast.stop("8123456")
    vast.start("8123456")
    assert [c.body for c in stub.calls("PUT", "/instances/8123456/")] == [
        {"state": "stopped"},
        {"state": "running"},
    ]


@pytest.mark.parametrize(
    "reply",
    [
        Reply(json={"success": True}),
        Reply(
            404, json={"success": False, "error": "no_such_instance", "msg": "Instance 8123456 not found."}
        ),
        Reply(
            200, json={"success": False, "error": "no_such_instance", "msg": "Instance 8123456 not found."}
        ),
        Reply(404, text="Not Found"),
    ],
    ids=["ok", "404-json", "200-error", "404-plain"],
)
def test_destroy_counts_no_such_instance_as_done(stub: VastStub, vast: VastAIProvider, reply: Reply) -> None:
    stub.on("DELETE", "/instances/8123456/", reply)
    vast.destroy("8123456")
    assert len(stub.calls("DELETE", "/instances/8123456/")) == 1


# ---- errors and retries -------------------------------------------------------------------


def test_429_plain_text_is_retried_then_raised(stub: VastStub, vast: VastAIProvider) -> None:
    stub.on("GET", "/instances/", Reply(429, text="API requests too frequent"))
    with pytest.raises(RetryableError, match="too frequent") as info:
        vast.list()
    assert info.value.status_code == 429
    assert len(stub.calls("GET", "/instances/")) == 4  # max_attempts


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_transient_errors_are_retried_until_success(
    stub: VastStub, vast: VastAIProvider, status: int
) -> None:
    busy = Reply(status, text="API requests too frequent" if status == 429 else "<html>upstream</html>")
    stub.on("GET", "/instances/", busy, busy, Reply(json={"instances": [INSTANCE]}))
    assert [i.instance_id for i in vast.list()] == ["8123456"]
    assert len(stub.calls("GET", "/instances/")) == 3


def test_connection_refused_is_retryable(vast: VastAIProvider) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        closed = VastAIProvider(
            API_KEY, base_url=f"http://127.0.0.1:{port}/", max_attempts=2, backoff_initial=0.01
        )
        with pytest.raises(RetryableError, match="ConnectionError"):
            closed.get("1")


@pytest.mark.parametrize("status", [401, 403])
def test_auth_errors_are_not_retried(stub: VastStub, vast: VastAIProvider, status: int) -> None:
    stub.on(
        "POST", "/bundles/", Reply(status, json={"success": False, "error": "auth_error", "msg": "bad key"})
    )
    with pytest.raises(AuthError):
        vast.search_offers(OfferQuery())
    assert len(stub.calls("POST", "/bundles/")) == 1


def test_refusal_is_fatal_with_vast_message(stub: VastStub, vast: VastAIProvider) -> None:
    stub.on("PUT", "/asks/12981263/",
            Reply(400, json={"success": False, "error": "invalid_args", "msg": "disk must be at least 8 GB"}))  # fmt: skip
    with pytest.raises(FatalError, match="disk must be at least 8 GB") as info:
        vast.create(_offer(), _launch(disk_gb=1))
    assert info.value.status_code == 400 and not info.value.retryable
    assert len(stub.calls("PUT", "/asks/12981263/")) == 1


def test_api_key_never_leaks(stub: VastStub, vast: VastAIProvider, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    def echo(seen: Seen) -> Reply:  # a server that echoes the request headers in its error
        return Reply(401, text=f"bad credentials: {seen.headers['Authorization']}")

    stub.on("GET", "/instances/", echo)
    stub.on("GET", "/instances/1/", Reply(500, json={"success": False, "msg": f"key {API_KEY} rejected"}))
    errors: list[BaseException] = []
    for call in (vast.list, lambda: vast.get("1")):
        with pytest.raises(ProviderError) as info:
            call()
        errors.append(info.value)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = VastAIProvider(API_KEY, base_url=f"http://127.0.0.1:{s.getsockname()[1]}/", max_attempts=1)
        with pytest.raises(RetryableError) as info:
            closed.list()
        errors.append(info.value)
    texts = [repr(vast), repr(vars(vast)), caplog.text]
    for exc in errors:
        texts += ["".join(traceback.format_exception(exc))]
        chained: BaseException | None = exc
        while chained is not None:  # nothing reachable from the error may hold the key
            texts += [str(chained), repr(chained), repr(vars(chained))]
            assert not type(chained).__module__.startswith(("requests", "urllib3")), (
                "holds the prepared request"
            )
            chained = chained.__cause__ or chained.__context__
    assert not [t for t in texts if API_KEY in t]
    assert "***" in str(errors[0])  # redacted, not dropped: the message still says what happened
