"""The GCP adapter against recorded Compute Engine responses, served by a tiny local HTTP stub.

The same stub is the OAuth2 token endpoint (the test key's `token_uri` points at it), so the whole
auth path runs: google-auth signs a JWT grant with a key generated here, and the tests verify it.
Tests assert on what GCP would receive (paths, query, bodies, headers), not on our strings.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import shlex
import subprocess
import threading
import urllib.parse
import uuid
from collections.abc import Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from machines.providers.base import (
    STATUS_CREATING,
    STATUS_GONE,
    STATUS_RUNNING,
    STATUS_STOPPED,
    AuthError,
    CapacityError,
    FatalError,
    LaunchRequest,
    NotFoundError,
    OfferQuery,
    RetryableError,
    get_provider,
)
from machines.providers.gcp import GCPProvider, instance_name, label_value

FIXTURES = Path(__file__).parent / "fixtures" / "gcp"
PROJECT = "dumont-standby-demo"
ZONE = "us-central1-a"
NAME = "dumont-i42-sb1"
INSTANCE_ID = f"{ZONE}/{NAME}"
CLIENT_EMAIL = f"dumont-standby@{PROJECT}.iam.gserviceaccount.com"
PRIVATE_KEY_ID = "3f1c9a7be2d4058e6a1f0c2b9d8e7a6b5c4d3e2f"
TOKEN = "ya29.c.c0AY_VpZgT3stT0kEnD0NotReal_d8f2a91c"  # what token.json hands out
ED25519 = "AAAAC3NzaC1lZDI1NTE5AAAAIHAdjBD+hrgQuxU2wU0o4LLdyE2fWEhOVcrhbJ3xieDP"  # in the guest attributes
INSERT_OP = "operation-1772460849012-64c0f1e3a2b8d-5a1e0f43-8c3b9d21"
DELETE_OP = "operation-1772461202334-64c0f33a8e1f2-0b7d4c11-e2a5f6c0"
START_OP = "operation-1772463301554-64c0fb1d0d8b1-9f3e6a05-1c4b77d2"

_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PRIVATE_KEY_PEM = _RSA.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
).decode()
PUBLIC_KEY_PEM = (
    _RSA.public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    .decode()
)
KEY_BODY_LINES = [line for line in PRIVATE_KEY_PEM.splitlines() if "-----" not in line]


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


def service_account_key(token_uri: str) -> str:
    return json.dumps(
        {
            "type": "service_account",
            "project_id": PROJECT,
            "private_key_id": PRIVATE_KEY_ID,
            "private_key": PRIVATE_KEY_PEM,
            "client_email": CLIENT_EMAIL,
            "client_id": "104731829501736482911",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": token_uri,
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "client_x509_cert_url": "https://www.googleapis.com/robot/v1/metadata/x509/"
            + urllib.parse.quote(CLIENT_EMAIL),
            "universe_domain": "googleapis.com",
        }
    )


class Request:
    def __init__(self, method: str, raw_path: str, headers: dict[str, str], body: bytes):
        parsed = urllib.parse.urlsplit(raw_path)
        self.method = method
        self.path = parsed.path
        self.query = dict(urllib.parse.parse_qsl(parsed.query))
        self.headers = headers
        self.form: dict[str, str] = {}
        self.json: Any = None
        if headers.get("Content-Type", "").startswith("application/x-www-form-urlencoded"):
            self.form = dict(urllib.parse.parse_qsl(body.decode()))
        elif body:
            self.json = json.loads(body)


class Stub:
    """Compute API under /compute/v1/ and the token endpoint at /token. Each (method, path) answers
    from a script of (status, body) replies; the last one repeats. Unscripted paths answer 418."""

    def __init__(self) -> None:
        self.replies: dict[tuple[str, str], list[tuple[int, Any]]] = {}
        self.requests: list[Request] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                request = Request(self.command, self.path, dict(self.headers), body)
                stub.requests.append(request)
                script = stub.replies.get((request.method, request.path)) or [
                    (418, {"error": {"code": 418, "message": f"unscripted {request.method} {request.path}"}})
                ]
                status, reply = script.pop(0) if len(script) > 1 else script[0]
                data = reply.encode() if isinstance(reply, str) else json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.root = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.compute_url = f"{self.root}/compute/v1/"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True)
        self.thread.start()
        self.reply("POST", "/token", "token.json")

    @staticmethod
    def _path(path: str) -> str:
        return path if path.startswith("/") else f"/compute/v1/projects/{PROJECT}/{path}"

    def reply(self, method: str, path: str, *replies: tuple[int, Any] | str) -> None:
        """`path` relative to the project (or absolute); each reply a fixture name (HTTP 200) or
        (status, body)."""
        self.replies[(method, self._path(path))] = [
            (200, fixture(r)) if isinstance(r, str) else r for r in replies
        ]

    def calls(self, method: str, path: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and r.path == self._path(path)]

    @property
    def token_requests(self) -> list[Request]:
        return [r for r in self.requests if r.path == "/token"]

    @property
    def compute_requests(self) -> list[Request]:
        return [r for r in self.requests if r.path.startswith("/compute/")]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub() -> Iterator[Stub]:
    server = Stub()
    yield server
    server.close()


def make_provider(stub: Stub, **options: Any) -> GCPProvider:
    values = {"timeout": 5, "backoff_initial": 0.001, "backoff_max": 0.01, "poll_interval": 0}
    values.update(options)
    return GCPProvider(service_account_key(f"{stub.root}/token"), stub.compute_url, **values)


@pytest.fixture
def gcp(stub: Stub) -> GCPProvider:
    return make_provider(stub)


def launch(**overrides: Any) -> LaunchRequest:
    values: dict[str, Any] = {
        "label": NAME,
        "image": "",
        "disk_gb": 50,
        "ssh_public_keys": ("ssh-ed25519 AAAAcontrol dumont", "ssh-rsa AAAAowner alice@laptop"),
        "env": {"DUMONT_INSTANCE": "42"},
        "onstart": "systemctl start dumont-mirror",
    }
    values.update(overrides)
    return LaunchRequest(**values)


def metadata(body: dict[str, Any]) -> dict[str, str]:
    return {item["key"]: item["value"] for item in body["metadata"]["items"]}


INSTANCE = f"zones/{ZONE}/instances/{NAME}"
HOSTKEYS = f"{INSTANCE}/getGuestAttributes"


# ---- auth ---------------------------------------------------------------------------------


def test_the_token_comes_from_a_signed_jwt_grant_and_is_cached(gcp: GCPProvider, stub: Stub) -> None:
    stub.reply("GET", INSTANCE, "instance_staging.json")
    gcp.get(INSTANCE_ID)
    gcp.get(INSTANCE_ID)

    [grant] = stub.token_requests  # one token for both calls: cached until near expiry
    assert grant.method == "POST"
    assert grant.form["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
    assertion = grant.form["assertion"]
    assert jwt.get_unverified_header(assertion) == {"alg": "RS256", "typ": "JWT", "kid": PRIVATE_KEY_ID}
    claims = jwt.decode(
        assertion, PUBLIC_KEY_PEM, algorithms=["RS256"], audience="https://oauth2.googleapis.com/token"
    )
    assert claims["iss"] == CLIENT_EMAIL
    assert claims["scope"] == "https://www.googleapis.com/auth/compute"
    assert claims["exp"] - claims["iat"] == 3600
    assert "Authorization" not in grant.headers  # the grant is the credential

    assert len(stub.compute_requests) == 2
    for request in stub.compute_requests:
        assert request.headers["Authorization"] == f"Bearer {TOKEN}"
        assert request.path == f"/compute/v1/projects/{PROJECT}/{INSTANCE}"  # project from the key


def test_a_token_near_its_expiry_is_replaced(gcp: GCPProvider, stub: Stub) -> None:
    stub.reply("POST", "/token", (200, {**fixture("token.json"), "expires_in": 60}))  # inside the margin
    stub.reply("GET", INSTANCE, "instance_staging.json")
    gcp.get(INSTANCE_ID)
    gcp.get(INSTANCE_ID)
    assert len(stub.token_requests) == 2


def test_a_rejected_token_is_replaced_once_then_the_401_is_an_auth_error(
    gcp: GCPProvider, stub: Stub
) -> None:
    stub.reply("GET", INSTANCE, (401, fixture("error_unauthenticated.json")), "instance_staging.json")
    assert gcp.get(INSTANCE_ID).status == STATUS_CREATING  # revoked early: a fresh token, then fine
    assert len(stub.token_requests) == 2

    stub.reply("GET", INSTANCE, (401, fixture("error_unauthenticated.json")))
    with pytest.raises(AuthError, match="HTTP 401"):
        gcp.get(INSTANCE_ID)
    assert len(stub.token_requests) == 3
    assert len(stub.calls("GET", INSTANCE)) == 4  # 2 + 2: never an endless refresh loop


def test_a_refused_grant_is_an_auth_error_without_any_compute_call(gcp: GCPProvider, stub: Stub) -> None:
    stub.reply("POST", "/token", (400, fixture("token_invalid_grant.json")))
    with pytest.raises(AuthError, match="invalid_grant"):
        gcp.get(INSTANCE_ID)
    assert len(stub.token_requests) == 1  # not retried
    assert stub.compute_requests == []


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda key: "{not json", "Not JSON"),
        (lambda key: json.dumps([key]), "JSON object"),
        (lambda key: json.dumps({**key, "type": "authorized_user"}), "service_account"),
        (lambda key: json.dumps({k: v for k, v in key.items() if k != "client_email"}), "client_email"),
        (
            lambda key: json.dumps({**key, "private_key": "-----BEGIN PRIVATE KEY-----\nAAAA\n"}),
            "cannot be read",
        ),
    ],
)
def test_a_key_that_is_not_a_service_account_key_is_refused(mutate, error: str) -> None:
    key = json.loads(service_account_key("https://oauth2.googleapis.com/token"))
    with pytest.raises(AuthError, match=error) as refused:
        GCPProvider(mutate(key))
    assert not any(line in str(refused.value) for line in KEY_BODY_LINES)


# ---- offers -------------------------------------------------------------------------------


def test_standby_offers_are_priced_from_the_table_plus_the_disk(gcp: GCPProvider, stub: Stub) -> None:
    offer = gcp.standby_offer(zone=ZONE, machine_type="e2-standard-2", disk_gb=50, spot=False)
    assert (offer.provider, offer.offer_id, offer.host_id, offer.region) == (
        "gcp",
        f"{ZONE}/e2-standard-2",
        ZONE,
        ZONE,
    )
    assert (offer.gpu_name, offer.num_gpus, offer.gpu_ram_gb, offer.disk_gb) == ("CPU", 0, 0, 50.0)
    # 0.0670 $/h + 50 GB x 0.10 $/GB-month / 730 h = 0.073849...
    assert offer.price_per_hour == Decimal("0.0738")

    spot = gcp.standby_offer(zone=ZONE, machine_type="e2-standard-2", disk_gb=50, spot=True)
    assert (spot.offer_id, spot.price_per_hour) == (f"{ZONE}/e2-standard-2:spot", Decimal("0.0289"))

    # Not in the table: 22 vCPUs x 0.0486 + 20 GB of disk
    other = gcp.standby_offer(zone=ZONE, machine_type="c3-standard-22", disk_gb=20, spot=False)
    assert (other.price_per_hour, other.raw["price_source"]) == (Decimal("1.0719"), "per-vcpu estimate")
    assert stub.requests == []  # prices need no API call

    with pytest.raises(FatalError, match="not a GCP offer id"):
        gcp.standby_offer(zone="us-central1-a/../x", machine_type="e2-standard-2", disk_gb=20, spot=False)


def test_gpu_queries_find_nothing_and_cpu_queries_list_the_table(gcp: GCPProvider, stub: Stub) -> None:
    assert gcp.search_offers(OfferQuery()) == []
    assert gcp.search_offers(OfferQuery(gpu_name="RTX 4090")) == []
    assert gcp.search_offers(OfferQuery(gpu_name="CPU", region="US")) == []  # a country is not a zone

    cheap = gcp.search_offers(
        OfferQuery(
            gpu_name="cpu", region="europe-west4-a", interruptible=True, max_price_per_hour=Decimal("0.03")
        )
    )
    assert [(o.offer_id, o.price_per_hour) for o in cheap] == [
        ("europe-west4-a/n2d-standard-2:spot", Decimal("0.0238")),
        ("europe-west4-a/e2-standard-2:spot", Decimal("0.0248")),
        ("europe-west4-a/n2-standard-2:spot", Decimal("0.0262")),
    ]
    assert len(gcp.search_offers(OfferQuery(gpu_name="CPU"))) == 10  # in the default zone
    assert gcp.search_offers(OfferQuery(gpu_name="CPU", exclude_host_ids=("us-central1-a",))) == []
    assert stub.requests == []


# ---- create -------------------------------------------------------------------------------


def test_create_inserts_what_gce_expects_and_polls_the_operation_until_done(
    gcp: GCPProvider, stub: Stub
) -> None:
    stub.reply("POST", f"zones/{ZONE}/instances", "operation_insert_pending.json")
    stub.reply(
        "GET",
        f"zones/{ZONE}/operations/{INSERT_OP}",
        "operation_insert_running.json",
        "operation_insert_done.json",
    )
    stub.reply("GET", INSTANCE, "instance_staging.json")
    offer = gcp.standby_offer(zone=ZONE, machine_type="e2-standard-2", disk_gb=50, spot=False)
    instance = gcp.create(offer, launch())

    [insert] = stub.calls("POST", f"zones/{ZONE}/instances")
    assert uuid.UUID(insert.query["requestId"])  # GCE's own retry guard
    body = insert.json
    assert body["name"] == NAME
    assert body["machineType"] == f"zones/{ZONE}/machineTypes/e2-standard-2"
    assert body["labels"] == {"dumont-label": NAME, "managed-by": "dumont"}
    assert body["disks"] == [
        {
            "boot": True,
            "autoDelete": True,
            "initializeParams": {
                "sourceImage": "projects/debian-cloud/global/images/family/debian-12",
                "diskSizeGb": "50",
                "diskType": f"zones/{ZONE}/diskTypes/pd-balanced",
            },
        }
    ]
    assert body["networkInterfaces"][0]["accessConfigs"] == [
        {"type": "ONE_TO_ONE_NAT", "name": "External NAT"}
    ]
    assert "scheduling" not in body  # on-demand
    items = metadata(body)
    assert set(items) == {"enable-guest-attributes", "ssh-keys", "startup-script", "dumont-label"}
    assert items["enable-guest-attributes"] == "TRUE"
    assert items["dumont-label"] == NAME
    assert items["ssh-keys"].splitlines() == [
        "dumont:ssh-ed25519 AAAAcontrol dumont",
        "dumont:ssh-rsa AAAAowner alice@laptop",
    ]
    assert len(stub.calls("GET", f"zones/{ZONE}/operations/{INSERT_OP}")) == 2  # RUNNING, then DONE
    assert (instance.instance_id, instance.status, instance.raw_status) == (
        INSTANCE_ID,
        STATUS_CREATING,
        "STAGING",
    )
    assert (instance.label, instance.host_id, instance.ssh_user) == (NAME, ZONE, "root")
    assert not instance.ssh_ready
    assert stub.calls("GET", HOSTKEYS) == []  # not running yet: no host key to read


def test_the_startup_script_installs_the_keys_for_root_and_runs_the_onstart_last(
    gcp: GCPProvider, stub: Stub, tmp_path: Path
) -> None:
    stub.reply("POST", f"zones/{ZONE}/instances", "operation_insert_done.json")
    stub.reply("GET", INSTANCE, "instance_staging.json")
    tricky = "it's\n'; rm -rf / #"
    offer = gcp.standby_offer(zone=ZONE, machine_type="e2-standard-2", disk_gb=50, spot=False)
    gcp.create(offer, launch(env={"DUMONT_INSTANCE": "42", "NOTE": tricky}))
    script = metadata(stub.calls("POST", f"zones/{ZONE}/instances")[0].json)["startup-script"]

    assert subprocess.run(["bash", "-n"], input=script, text=True, check=False).returncode == 0
    lines = script.splitlines()
    for key in ("ssh-ed25519 AAAAcontrol dumont", "ssh-rsa AAAAowner alice@laptop"):
        quoted = shlex.quote(key)
        assert (
            f"grep -qxF {quoted} /root/.ssh/authorized_keys || echo {quoted} >> /root/.ssh/authorized_keys"
            in lines
        )
    assert "echo 'PermitRootLogin prohibit-password' > /etc/ssh/sshd_config.d/00-dumont.conf" in lines
    assert any(line.startswith("systemctl reload ssh") for line in lines)
    assert "mkdir -p /workspace" in lines
    words = shlex.split(script, comments=True)
    at = words.index("/etc/profile.d/dumont-env.sh")
    assert words[at - 4 : at] == ["printf", "%s", words[at - 2], ">"]
    env_file = tmp_path / "dumont-env.sh"
    env_file.write_text(words[at - 2])
    sourced = subprocess.run(
        ["bash", "-c", '. "$1" && printf %s "$DUMONT_INSTANCE|$NOTE"', "-", str(env_file)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert sourced.stdout == f"42|{tricky}"  # exported as given, nothing of it run
    assert lines[-1] == "systemctl start dumont-mirror"
    assert script.index("dumont-env.sh") < script.index("systemctl start dumont-mirror")


def test_a_spot_offer_is_created_as_a_spot_vm_that_stops_when_preempted(gcp: GCPProvider, stub: Stub) -> None:
    stub.reply("POST", f"zones/{ZONE}/instances", "operation_insert_done.json")
    stub.reply("GET", INSTANCE, "instance_staging.json")
    offer = gcp.standby_offer(zone=ZONE, machine_type="n2d-standard-2", disk_gb=30, spot=True)
    gcp.create(offer, launch(disk_gb=0))

    body = stub.calls("POST", f"zones/{ZONE}/instances")[0].json
    assert body["scheduling"]["provisioningModel"] == "SPOT"
    assert body["scheduling"]["instanceTerminationAction"] == "STOP"
    assert body["machineType"] == f"zones/{ZONE}/machineTypes/n2d-standard-2"
    assert body["disks"][0]["initializeParams"]["diskSizeGb"] == "30"  # the offer's, as the launch gave none
    assert stub.calls("GET", f"zones/{ZONE}/operations/{INSERT_OP}") == []  # DONE at once: no polling


def test_a_name_that_exists_already_is_that_machine_not_a_second_one(gcp: GCPProvider, stub: Stub) -> None:
    stub.reply("POST", f"zones/{ZONE}/instances", (409, fixture("error_already_exists.json")))
    stub.reply("GET", INSTANCE, "instance_running.json")
    stub.reply("GET", HOSTKEYS, "guest_attributes_hostkeys.json")
    offer = gcp.standby_offer(zone=ZONE, machine_type="e2-standard-2", disk_gb=50, spot=False)
    instance = gcp.create(offer, launch())
    assert (instance.instance_id, instance.status) == (INSTANCE_ID, STATUS_RUNNING)
    assert len(stub.calls("POST", f"zones/{ZONE}/instances")) == 1

    foreign = fixture("instance_running.json")  # same name, but not made for this label
    foreign["metadata"]["items"] = [i for i in foreign["metadata"]["items"] if i["key"] != "dumont-label"]
    stub.reply("GET", INSTANCE, (200, foreign))
    with pytest.raises(FatalError, match="belongs to another machine"):
        gcp.create(offer, launch())


def test_a_create_resent_after_a_lost_answer_finds_the_first_machine(gcp: GCPProvider, stub: Stub) -> None:
    stub.reply(
        "POST",
        f"zones/{ZONE}/instances",
        (503, fixture("error_backend.json")),  # maybe applied upstream
        (409, fixture("error_already_exists.json")),  # it was
    )
    stub.reply("GET", INSTANCE, "instance_staging.json")
    offer = gcp.standby_offer(zone=ZONE, machine_type="e2-standard-2", disk_gb=50, spot=False)
    assert gcp.create(offer, launch()).instance_id == INSTANCE_ID
    inserts = stub.calls("POST", f"zones/{ZONE}/instances")
    assert len(inserts) == 2
    assert inserts[0].query["requestId"] == inserts[1].query["requestId"]


@pytest.mark.parametrize(
    "operation",
    [
        "operation_insert_quota_exceeded.json",
        "operation_insert_zone_exhausted.json",
        "operation_insert_zone_exhausted_with_details.json",
    ],
)
def test_an_insert_operation_that_failed_for_capacity_is_a_capacity_error(
    gcp: GCPProvider, stub: Stub, operation: str
) -> None:
    stub.reply("POST", f"zones/{ZONE}/instances", "operation_insert_pending.json")
    stub.reply("GET", f"zones/{ZONE}/operations/{INSERT_OP}", "operation_insert_running.json", operation)
    offer = gcp.standby_offer(zone=ZONE, machine_type="e2-standard-2", disk_gb=50, spot=False)
    with pytest.raises(CapacityError) as failed:
        gcp.create(offer, launch())
    assert fixture(operation)["error"]["errors"][0]["code"] in str(failed.value)
    assert len(stub.calls("POST", f"zones/{ZONE}/instances")) == 1  # not resent: try another offer


def test_an_insert_refused_outright_maps_to_its_error_without_resending(gcp: GCPProvider, stub: Stub) -> None:
    offer = gcp.standby_offer(zone=ZONE, machine_type="e2-standard-2", disk_gb=50, spot=False)
    for reply, error in [
        ((403, fixture("error_quota_exceeded.json")), CapacityError),
        ((403, fixture("error_forbidden.json")), AuthError),
        ((400, fixture("error_invalid.json")), FatalError),
        ((404, fixture("error_not_found.json")), FatalError),  # a zone / type / image: not an instance
    ]:
        stub.requests.clear()
        stub.reply("POST", f"zones/{ZONE}/instances", reply)
        with pytest.raises(error):
            gcp.create(offer, launch())
        assert len(stub.calls("POST", f"zones/{ZONE}/instances")) == 1, reply


def test_a_slow_insert_returns_the_machine_as_creating(stub: Stub) -> None:
    gcp = make_provider(stub, poll_interval=0.01, operation_timeout=0.05)
    stub.reply("POST", f"zones/{ZONE}/instances", "operation_insert_pending.json")
    stub.reply("GET", f"zones/{ZONE}/operations/{INSERT_OP}", "operation_insert_running.json")
    stub.reply("GET", INSTANCE, "instance_staging.json")
    offer = gcp.standby_offer(zone=ZONE, machine_type="e2-standard-2", disk_gb=50, spot=False)
    instance = gcp.create(offer, launch())
    assert (instance.instance_id, instance.status) == (INSTANCE_ID, STATUS_CREATING)  # the caller polls get()
    assert 1 <= len(stub.calls("GET", f"zones/{ZONE}/operations/{INSERT_OP}")) <= 10


def test_names_are_valid_for_gce_stable_and_distinct() -> None:
    valid = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?\Z")
    assert instance_name("dumont-i42-sb1", ZONE) == "dumont-i42-sb1"  # already a name: kept
    labels = ["Dumont_I42/round 1", "dumont-i42-round-1", "DUMONT-I42-ROUND-1", "42-standby", "", "x" * 80]
    names = [instance_name(label, "northamerica-northeast1-a") for label in labels]
    for label, name in zip(labels, names, strict=True):
        assert valid.match(name), (label, name)
        assert len("northamerica-northeast1-a/" + name) <= 64
        assert name == instance_name(label, "northamerica-northeast1-a")
    assert len(set(names)) == len(names)  # case or punctuation never merges two labels
    assert names[0].startswith("dumont-i42-round-1-")
    assert names[3].startswith("d-42-standby-")
    assert label_value("Dumont_I42/round 1") == "dumont_i42-round-1"
    assert len(label_value("x" * 80)) == 63


# ---- state --------------------------------------------------------------------------------


def test_a_running_instance_has_its_nat_ip_price_start_time_and_ed25519_host_key(
    gcp: GCPProvider, stub: Stub
) -> None:
    stub.reply("GET", INSTANCE, "instance_running.json")
    stub.reply("GET", HOSTKEYS, "guest_attributes_hostkeys.json")
    instance = gcp.get(INSTANCE_ID)

    assert (instance.status, instance.raw_status, instance.ssh_ready) == (STATUS_RUNNING, "RUNNING", True)
    assert (instance.ssh_host, instance.ssh_port, instance.ssh_user) == ("34.132.87.201", 22, "root")
    assert (instance.label, instance.host_id, instance.price_per_hour) == (NAME, ZONE, Decimal("0.0738"))
    assert instance.started_at == 1772460861.734  # 2026-03-02T06:14:21.734-08:00
    assert instance.ssh_host_key == f"ssh-ed25519 {ED25519}"  # preferred over the ecdsa and rsa keys
    [attributes] = stub.calls("GET", HOSTKEYS)
    assert attributes.query == {"queryPath": "hostkeys/"}


@pytest.mark.parametrize(
    "reply", [(404, fixture("error_guest_attributes_not_found.json")), "guest_attributes_empty.json"]
)
def test_a_host_key_not_published_yet_is_none_not_an_error(gcp: GCPProvider, stub: Stub, reply) -> None:
    stub.reply("GET", INSTANCE, "instance_running.json")
    stub.reply("GET", HOSTKEYS, reply)
    instance = gcp.get(INSTANCE_ID)
    assert (instance.status, instance.ssh_host_key) == (STATUS_RUNNING, None)


def test_a_published_key_whose_blob_is_not_of_its_type_is_ignored(gcp: GCPProvider, stub: Stub) -> None:
    attributes = fixture("guest_attributes_hostkeys.json")
    items = attributes["queryValue"]["items"]
    rsa_blob = next(i["value"] for i in items if i["key"] == "ssh-rsa")
    for item in items:
        if item["key"] == "ssh-ed25519":
            item["value"] = rsa_blob  # claims ed25519, is an rsa key
    stub.reply("GET", INSTANCE, "instance_running.json")
    stub.reply("GET", HOSTKEYS, (200, attributes))
    assert gcp.get(INSTANCE_ID).ssh_host_key.startswith("ecdsa-sha2-nistp256 AAAAE2VjZHNh")


@pytest.mark.parametrize(
    ("gce_status", "status"),
    [
        ("PROVISIONING", STATUS_CREATING),
        ("STAGING", STATUS_CREATING),
        ("REPAIRING", STATUS_CREATING),
        ("STOPPING", STATUS_STOPPED),
        ("STOPPED", STATUS_STOPPED),
        ("SUSPENDING", STATUS_STOPPED),
        ("SUSPENDED", STATUS_STOPPED),
        ("TERMINATED", STATUS_STOPPED),
    ],
)
def test_gce_statuses_are_normalised(gcp: GCPProvider, stub: Stub, gce_status: str, status: str) -> None:
    stub.reply("GET", INSTANCE, (200, {**fixture("instance_running.json"), "status": gce_status}))
    instance = gcp.get(INSTANCE_ID)
    assert (instance.status, instance.raw_status, instance.ssh_ready) == (status, gce_status, False)
    assert stub.calls("GET", HOSTKEYS) == []


def test_a_preempted_spot_vm_is_stopped_and_priced_as_spot(gcp: GCPProvider, stub: Stub) -> None:
    stub.reply("GET", "zones/europe-west4-a/instances/dumont-i77-sb2", "instance_terminated_spot.json")
    instance = gcp.get("europe-west4-a/dumont-i77-sb2")
    assert (instance.status, instance.raw_status, instance.ssh_host) == (STATUS_STOPPED, "TERMINATED", None)
    # n2d-standard-4 spot 0.0422 + 100 GB of pd-balanced 0.0137
    assert instance.price_per_hour == Decimal("0.0559")


def test_a_missing_or_malformed_instance_is_gone(gcp: GCPProvider, stub: Stub) -> None:
    stub.reply("GET", INSTANCE, (404, fixture("error_not_found.json")))
    gone = gcp.get(INSTANCE_ID)
    assert (gone.instance_id, gone.status) == (INSTANCE_ID, STATUS_GONE)
    assert len(stub.calls("GET", INSTANCE)) == 1  # a 404 is an answer, not retried
    assert gcp.get("../../etc").status == STATUS_GONE
    assert gcp.get("us-central1-a/Bad_Name").status == STATUS_GONE
    assert len(stub.compute_requests) == 1


def test_list_follows_pages_skips_empty_zones_and_keeps_our_label_prefix(
    gcp: GCPProvider, stub: Stub
) -> None:
    stub.reply(
        "GET", "aggregated/instances", "aggregated_instances_page1.json", "aggregated_instances_page2.json"
    )
    ours = gcp.list("dumont-")
    assert [(i.instance_id, i.status, i.label) for i in ours] == [
        (INSTANCE_ID, STATUS_RUNNING, NAME),
        ("europe-west4-a/dumont-i77-sb2", STATUS_STOPPED, "dumont-i77-sb2"),
    ]
    first, second = stub.calls("GET", "aggregated/instances")
    assert "pageToken" not in first.query
    assert second.query["pageToken"] == fixture("aggregated_instances_page1.json")["nextPageToken"]

    stub.reply(
        "GET", "aggregated/instances", "aggregated_instances_page1.json", "aggregated_instances_page2.json"
    )
    everything = gcp.list()
    assert sorted(i.label for i in everything) == ["dumont-i42-sb1", "dumont-i77-sb2", "web-frontend"]
    assert stub.calls("GET", HOSTKEYS) == []  # a listing reads no host keys


# ---- lifecycle ----------------------------------------------------------------------------


def test_destroy_deletes_waits_and_is_idempotent(gcp: GCPProvider, stub: Stub) -> None:
    stub.reply("DELETE", INSTANCE, "operation_delete_pending.json", (404, fixture("error_not_found.json")))
    stub.reply(
        "GET",
        f"zones/{ZONE}/operations/{DELETE_OP}",
        "operation_delete_running.json",
        "operation_delete_done.json",
    )
    gcp.destroy(INSTANCE_ID)
    assert len(stub.calls("GET", f"zones/{ZONE}/operations/{DELETE_OP}")) == 2
    gcp.destroy(INSTANCE_ID)  # already gone: success
    assert len(stub.calls("DELETE", INSTANCE)) == 2


def test_destroy_during_the_create_waits_for_the_instance_to_be_ready(gcp: GCPProvider, stub: Stub) -> None:
    stub.reply(
        "DELETE", INSTANCE, (400, fixture("error_resource_not_ready.json")), "operation_delete_done.json"
    )
    gcp.destroy(INSTANCE_ID)
    assert len(stub.calls("DELETE", INSTANCE)) == 2


def test_a_delete_still_running_at_the_deadline_is_retryable(stub: Stub) -> None:
    gcp = make_provider(stub, poll_interval=0.01, operation_timeout=0.05)
    stub.reply("DELETE", INSTANCE, "operation_delete_pending.json")
    stub.reply("GET", f"zones/{ZONE}/operations/{DELETE_OP}", "operation_delete_running.json")
    with pytest.raises(RetryableError, match="not done"):
        gcp.destroy(INSTANCE_ID)


def test_stop_and_start_wait_for_their_operations(gcp: GCPProvider, stub: Stub) -> None:
    stub.reply("POST", f"{INSTANCE}/stop", "operation_stop_done.json")
    gcp.stop(INSTANCE_ID)
    assert len(stub.calls("POST", f"{INSTANCE}/stop")) == 1

    # A preempted spot VM started again where the zone has no room left.
    spot = "zones/europe-west4-a/instances/dumont-i77-sb2"
    stub.reply("POST", f"{spot}/start", "operation_start_pending.json")
    stub.reply("GET", f"zones/europe-west4-a/operations/{START_OP}", "operation_start_zone_exhausted.json")
    with pytest.raises(CapacityError, match="ZONE_RESOURCE_POOL_EXHAUSTED"):
        gcp.start("europe-west4-a/dumont-i77-sb2")

    stub.reply("POST", f"{INSTANCE}/stop", (404, fixture("error_not_found.json")))
    with pytest.raises(NotFoundError):
        gcp.stop(INSTANCE_ID)


# ---- errors, retries, secrecy -------------------------------------------------------------


def test_server_errors_and_rate_limits_are_retried_then_succeed(gcp: GCPProvider, stub: Stub) -> None:
    stub.reply(
        "GET",
        INSTANCE,
        (503, fixture("error_backend.json")),
        (429, "Too Many Requests"),
        (403, fixture("error_rate_limit.json")),
        "instance_staging.json",
    )
    assert gcp.get(INSTANCE_ID).status == STATUS_CREATING
    assert len(stub.calls("GET", INSTANCE)) == 4


def test_retries_are_bounded(stub: Stub) -> None:
    gcp = make_provider(stub, max_attempts=3)
    stub.reply("GET", "aggregated/instances", (503, fixture("error_backend.json")))
    with pytest.raises(RetryableError) as failed:
        gcp.list()
    assert failed.value.status_code == 503
    assert len(stub.calls("GET", "aggregated/instances")) == 3


def test_an_unreachable_api_is_retryable(stub: Stub) -> None:
    gcp = make_provider(stub, max_attempts=2)
    stub.close()  # nothing listens there any more: not the token endpoint, not the API
    with pytest.raises(RetryableError):
        gcp.list()


def test_the_key_and_the_token_never_show(stub: Stub, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    gcp = get_provider(
        "gcp",
        api_key=service_account_key(f"{stub.root}/token"),
        base_url=stub.compute_url,
        max_attempts=2,
        backoff_initial=0.001,
        poll_interval=0,
    )
    assert isinstance(gcp, GCPProvider)
    echo = {
        "error": {"code": 400, "message": f"bad header Bearer {TOKEN}", "errors": [{"reason": "invalid"}]}
    }
    stub.reply("GET", INSTANCE, (400, echo))
    stub.reply("GET", "aggregated/instances", (503, f"upstream said {TOKEN}"))
    stub.reply("POST", f"{INSTANCE}/stop", "operation_stop_done.json")
    failures = []
    for call in (lambda: gcp.get(INSTANCE_ID), gcp.list):
        with pytest.raises(Exception) as failed:
            call()
        failures.append(failed.value)
    stub.reply("POST", "/token", (400, fixture("token_invalid_grant.json")))
    gcp._forget_token(TOKEN)  # the next call needs a new token, which is refused
    with pytest.raises(AuthError) as refused:
        gcp.stop(INSTANCE_ID)
    failures.append(refused.value)
    assert [type(f) for f in failures] == [FatalError, RetryableError, AuthError]

    shown = " ".join([repr(gcp), str(vars(gcp)), repr(gcp._session), caplog.text])
    shown += " ".join(f"{f!s} {f!r} {f.__context__!r} {f.__cause__!r}" for f in failures)
    assert TOKEN not in shown
    for line in KEY_BODY_LINES:
        assert line not in shown
    assert "***" in str(failures[0])
    assert base64.b64encode(TOKEN.encode()).decode() not in shown


def test_provider_client_builds_the_adapter_from_a_provider_account(db, settings, stub: Stub) -> None:
    from machines.clients import provider_client
    from machines.models import ProviderAccount
    from tests.factories import make_user

    settings.GCP_COMPUTE_API_URL = stub.compute_url
    account = ProviderAccount.objects.create(
        owner=make_user(),
        provider="gcp",
        name="standby",
        api_key=service_account_key(f"{stub.root}/token"),
        key_hint="xxxx",
    )
    gcp = provider_client("gcp", ProviderAccount.objects.get(pk=account.pk))  # decrypted from the row
    assert isinstance(gcp, GCPProvider)
    assert gcp.project == PROJECT
    stub.reply("GET", "aggregated/instances", "aggregated_instances_page2.json")
    assert [i.instance_id for i in gcp.list("dumont-")] == ["europe-west4-a/dumont-i77-sb2"]
    assert stub.calls("GET", "aggregated/instances")[0].headers["Authorization"] == f"Bearer {TOKEN}"
