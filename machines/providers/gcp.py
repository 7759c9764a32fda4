"""Google Compute Engine adapter (REST v1), used for cheap CPU "standby" machines that mirror a GPU
workspace. Recorded responses live in tests/machines/fixtures/gcp/.

* Account: `api_key` is the whole service-account key JSON. The project is its `project_id`; OAuth2
  access tokens come from its `token_uri` through google-auth (a JWT grant signed with the key),
  cached until shortly before they expire. The key and the tokens never reach a log line, an
  exception or a repr.
* Ids: an instance is `"{zone}/{name}"`. The name is derived from `LaunchRequest.label` (GCE names
  are `[a-z]([-a-z0-9]*[a-z0-9])?`, at most 63 characters, and here short enough that the id fits
  64); a label that is not already a valid name is sanitised and suffixed with a hash of the label,
  so two labels never share a name. The original label is kept in the instance metadata
  (`dumont-label`) and, sanitised, in its labels. A create whose name exists already (`409
  alreadyExists`, e.g. a create retried after a timeout) returns that instance: never two machines.
* Login: `root`, with the launch's keys installed by the startup script (which also allows root
  key login, creates /workspace, exports the env and runs the launch's onstart). The same keys go
  into the `ssh-keys` metadata for a `dumont` sudo user that the guest agent creates: a second way
  in. The SSH host key is read from the guest attributes the guest agent publishes
  (`enable-guest-attributes`), so the caller can pin it.
* Prices are ESTIMATES: the Compute API has no prices (they live in the Cloud Billing Catalog API).
  `PRICES` holds us-central1 list prices for a few machine types, on-demand and spot (spot prices
  float, roughly monthly); a boot disk is priced as pd-balanced. Other types are estimated per vCPU
  (`FALLBACK_PER_VCPU`), the vCPU count read from the type name. Other regions cost up to ~40% more.
* Offers: GCP is the CPU-standby provider, so `search_offers` answers GPU queries with nothing (a
  GPU race never lands here). Asked for `gpu_name="CPU"` it lists the table's machine types in the
  query's zone (`region` must then be a zone, e.g. "us-central1-a"; default `DEFAULT_ZONE`).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import hashlib
import json
import logging
import re
import shlex
import threading
import time
import urllib.parse
import uuid
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import google.auth.exceptions
import google.auth.transport.requests
import requests
import tenacity
from google.auth.credentials import TokenState
from google.oauth2 import service_account

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
    Offer,
    OfferQuery,
    Provider,
    ProviderError,
    ProviderInstance,
    RetryableError,
    register_provider,
)

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://compute.googleapis.com/compute/v1/"
COMPUTE_SCOPE = "https://www.googleapis.com/auth/compute"
BOOT_IMAGE = "projects/debian-cloud/global/images/family/debian-12"
BOOT_DISK_TYPE = "pd-balanced"
SSH_USER = "root"
METADATA_SSH_USER = "dumont"  # the guest agent makes it a sudoer from the `ssh-keys` metadata
LABEL_KEY = "dumont-label"  # instance label (sanitised) and metadata item (verbatim)
DEFAULT_ZONE = "us-central1-a"
DEFAULT_DISK_GB = 20
MIN_DISK_GB = 10  # the Debian 12 image's size
MAX_ID_LENGTH = 64  # "{zone}/{name}" must fit the control plane's provider_instance_id columns
SERVICE_ACCOUNT_FIELDS = ("type", "project_id", "private_key", "client_email", "token_uri")

# us-central1 list prices, $/hour: (on-demand, spot). Estimates, see the module docstring.
PRICES: dict[str, tuple[Decimal, Decimal]] = {
    "e2-standard-2": (Decimal("0.0670"), Decimal("0.0221")),
    "e2-standard-4": (Decimal("0.1340"), Decimal("0.0442")),
    "e2-standard-8": (Decimal("0.2681"), Decimal("0.0884")),
    "e2-highmem-2": (Decimal("0.0904"), Decimal("0.0298")),
    "e2-highmem-4": (Decimal("0.1808"), Decimal("0.0596")),
    "n2-standard-2": (Decimal("0.0971"), Decimal("0.0235")),
    "n2-standard-4": (Decimal("0.1942"), Decimal("0.0470")),
    "n2-standard-8": (Decimal("0.3885"), Decimal("0.0940")),
    "n2d-standard-2": (Decimal("0.0845"), Decimal("0.0211")),
    "n2d-standard-4": (Decimal("0.1690"), Decimal("0.0422")),
}
# A type not in the table: per vCPU (n2-standard's rate, memory included), on-demand and spot.
# A name without a vCPU count (e2-medium, f1-micro, ...) is priced as 1 vCPU.
FALLBACK_PER_VCPU = (Decimal("0.0486"), Decimal("0.0118"))
PD_BALANCED_GB_MONTH = Decimal("0.100")
HOURS_PER_MONTH = Decimal("730")

_STATUS_MAP = {
    "PROVISIONING": STATUS_CREATING,
    "STAGING": STATUS_CREATING,
    "REPAIRING": STATUS_CREATING,
    "RUNNING": STATUS_RUNNING,
    "STOPPING": STATUS_STOPPED,
    "STOPPED": STATUS_STOPPED,
    "SUSPENDING": STATUS_STOPPED,
    "SUSPENDED": STATUS_STOPPED,
    "TERMINATED": STATUS_STOPPED,  # stopped, or a preempted spot VM: both can be started again
}

# Error reasons (HTTP `error.errors[].reason`) and operation codes (`error.errors[].code`), compared
# lowercased without underscores, so "QUOTA_EXCEEDED" and "quotaExceeded" are one word.
_CAPACITY = {
    "quotaexceeded",
    "zoneresourcepoolexhausted",
    "zoneresourcepoolexhaustedwithdetails",
    "resourcepoolexhausted",
}
_RATE_LIMITED = {"ratelimitexceeded", "userratelimitexceeded", "resourceoperationrateexceeded"}
_NOT_READY = {"resourcenotready"}  # e.g. a delete while the instance is still being created
_NOT_FOUND = {"resourcenotfound", "notfound"}
_DENIED = {"permissiondenied", "forbidden", "insufficientpermissions", "accessnotconfigured"}
RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}
HOST_KEY_PREFERENCE = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ssh-rsa")

_NAME = re.compile(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?\Z")
_OPERATION = re.compile(r"[a-z0-9][-a-z0-9]{0,62}\Z")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_VCPUS = re.compile(r"-(?:custom-)?(\d+)(?:-\d+)?\Z")


# ---- service-account keys -----------------------------------------------------------------


def validate_service_account_key(api_key: str) -> dict[str, Any]:
    """The parsed key, or ValueError whose message names what is wrong (and never quotes the key)."""
    try:
        info = json.loads(api_key)
    except (TypeError, ValueError):
        raise ValueError("Not JSON: paste the whole service-account key file.") from None
    if not isinstance(info, dict):
        raise ValueError("Not a service-account key: expected a JSON object.")
    if info.get("type") != "service_account":
        raise ValueError('Not a service-account key: "type" must be "service_account".')
    missing = [f for f in SERVICE_ACCOUNT_FIELDS if not isinstance(info.get(f), str) or not info[f].strip()]
    if missing:
        raise ValueError(f"The service-account key lacks {', '.join(missing)}.")
    if not info["private_key"].lstrip().startswith("-----BEGIN"):
        raise ValueError("The service-account key's private_key is not a PEM key.")
    try:
        service_account.Credentials.from_service_account_info(info, scopes=[COMPUTE_SCOPE])
    except Exception:  # whatever the parser says may quote the key: say nothing of it
        raise ValueError("The service-account key's private_key cannot be read.") from None
    return info


# ---- names, offers, prices ----------------------------------------------------------------


def instance_name(label: str, zone: str) -> str:
    """A GCE-valid name for `label`, the same every time (create is exactly-once by name)."""
    limit = min(63, MAX_ID_LENGTH - len(zone) - 1)
    if _NAME.match(label) and len(label) <= limit:
        return label
    base = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]+", "-", label.lower())).strip("-")
    if not base[:1].isalpha():
        base = f"d-{base}".rstrip("-")
    digest = hashlib.sha256(label.encode()).hexdigest()[:8]
    return f"{base[: limit - len(digest) - 1].rstrip('-')}-{digest}"


def label_value(label: str) -> str:
    """GCE label values: lowercase letters, digits, `_` and `-`, at most 63 characters."""
    return re.sub(r"[^a-z0-9_-]", "-", label.lower())[:63]


def machine_price(machine_type: str, *, spot: bool) -> Decimal:
    """$/h for the machine alone: the table, else the per-vCPU estimate (see the module docstring)."""
    if machine_type in PRICES:
        return PRICES[machine_type][1 if spot else 0]
    match = _VCPUS.search(machine_type)
    vcpus = int(match.group(1)) if match else 1
    return FALLBACK_PER_VCPU[1 if spot else 0] * vcpus


def disk_price(disk_gb: float) -> Decimal:
    return PD_BALANCED_GB_MONTH * Decimal(str(disk_gb)) / HOURS_PER_MONTH


def standby_price(machine_type: str, disk_gb: float, *, spot: bool) -> Decimal:
    total = machine_price(machine_type, spot=spot) + disk_price(disk_gb)
    return total.quantize(Decimal("0.0001"), rounding=ROUND_HALF_UP)


def parse_offer_id(offer_id: str) -> tuple[str, str, bool]:
    """`"{zone}/{machine_type}"`, with `":spot"` appended for a spot offer."""
    zone, sep, rest = offer_id.partition("/")
    machine_type, _, marker = rest.partition(":")
    if not sep or not _NAME.match(zone) or not _NAME.match(machine_type) or marker not in ("", "spot"):
        raise FatalError(f"not a GCP offer id: {offer_id!r}", provider="gcp")
    return zone, machine_type, marker == "spot"


def parse_instance_id(instance_id: str) -> tuple[str, str]:
    zone, sep, name = instance_id.partition("/")
    if not sep or not _NAME.match(zone) or not _NAME.match(name):
        raise NotFoundError(f"not a GCP instance id: {instance_id!r}", provider="gcp")
    return zone, name


def _last_segment(url: Any) -> str:
    return str(url or "").rstrip("/").rsplit("/", 1)[-1]


def _norm(word: Any) -> str:
    return str(word or "").replace("_", "").lower()


def _timestamp(value: Any) -> float | None:
    try:
        return datetime.datetime.fromisoformat(str(value)).timestamp() if value else None
    except ValueError:
        return None


# ---- boot ---------------------------------------------------------------------------------


def build_startup_script(launch: LaunchRequest) -> str:
    """Run as root by the guest agent on every boot, so every step is idempotent."""
    lines = [
        "#!/bin/bash",
        "# dumont: the control plane's and the owner's keys for root, first",
        "umask 077",
        "mkdir -p /root/.ssh",
        "touch /root/.ssh/authorized_keys",
    ]
    for key in launch.ssh_public_keys:
        key = key.strip()
        if not key or "\n" in key or "\r" in key:
            raise FatalError("an SSH public key must be one non-empty line", provider="gcp")
        quoted = shlex.quote(key)
        lines.append(
            f"grep -qxF {quoted} /root/.ssh/authorized_keys || echo {quoted} >> /root/.ssh/authorized_keys"
        )
    env_lines = []
    for name, value in launch.env.items():
        if not _ENV_NAME.match(name):
            raise FatalError(f"not an environment variable name: {name!r}", provider="gcp")
        env_lines.append(f"export {name}={shlex.quote(str(value))}\n")
    env_file = "".join(env_lines)
    lines += [
        "umask 022",
        "# root logs in by key only: a drop-in, read before sshd_config (GCE images may forbid root there)",
        "mkdir -p /etc/ssh/sshd_config.d",
        "echo 'PermitRootLogin prohibit-password' > /etc/ssh/sshd_config.d/00-dumont.conf",
        "systemctl reload ssh 2>/dev/null || systemctl reload sshd 2>/dev/null || true",
        "mkdir -p /workspace",
        "# the launch's environment, for this script and for every login shell",
        f"printf '%s' {shlex.quote(env_file)} > /etc/profile.d/dumont-env.sh",
        ". /etc/profile.d/dumont-env.sh",
    ]
    if launch.onstart.strip():
        lines += ["cd /workspace", launch.onstart.rstrip("\n")]
    return "\n".join(lines) + "\n"


def _host_key(items: list[Any]) -> str | None:
    """The preferred published host key as "type base64", if its blob really is of that type."""
    keys: dict[str, str] = {}
    for item in items:
        if not isinstance(item, dict) or item.get("namespace", "hostkeys") != "hostkeys":
            continue
        key_type, fields = str(item.get("key") or ""), str(item.get("value") or "").split()
        if fields and fields[0] == key_type:  # "type blob [comment]" rather than the bare blob
            fields = fields[1:]
        if fields and _blob_type(fields[0]) == key_type:
            keys[key_type] = fields[0]
    for key_type in HOST_KEY_PREFERENCE:
        if key_type in keys:
            return f"{key_type} {keys[key_type]}"
    return None


def _blob_type(blob: str) -> str | None:
    try:
        raw = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        return None
    size = int.from_bytes(raw[:4], "big")
    return raw[4 : 4 + size].decode("ascii", "replace") if len(raw) >= 4 + size else None


# ---- transport ----------------------------------------------------------------------------


class _TokenTransport(google.auth.transport.requests.Request):
    """google-auth's requests transport, held to our timeout (its own default is 120 s)."""

    def __init__(self, timeout: float):
        super().__init__(requests.Session())
        self._timeout = timeout

    def __call__(self, url, method="GET", body=None, headers=None, timeout=None, **kwargs):
        return super().__call__(url, method, body, headers, timeout=timeout or self._timeout, **kwargs)

    def __repr__(self) -> str:
        return "<TokenTransport>"


class _AlreadyExists(FatalError):
    """409 alreadyExists. Private: create() turns it into the existing instance."""


class _StillRunning(RetryableError):
    """The operation was accepted but is not DONE by the deadline."""


@register_provider("gcp")
class GCPProvider(Provider):
    def __init__(
        self,
        api_key: str,
        base_url: str = DEFAULT_BASE_URL,
        timeout: float = 20,
        max_attempts: int = 5,
        *,
        backoff_initial: float = 0.5,
        backoff_max: float = 10.0,
        poll_interval: float = 2.0,
        operation_timeout: float = 300.0,
    ):
        try:
            info = validate_service_account_key(api_key)
        except ValueError as exc:
            raise AuthError(f"GCP: {exc}", provider="gcp") from None
        self._project = info["project_id"]
        self._client_email = info["client_email"]
        # The credentials object is the only holder of the key (and of the current token).
        self._credentials = service_account.Credentials.from_service_account_info(
            info, scopes=[COMPUTE_SCOPE]
        )
        self._token_lock = threading.Lock()
        self._token_transport = _TokenTransport(timeout)
        self._base_url = base_url.rstrip("/") + "/"
        self._timeout = timeout
        self._max_attempts = max(1, max_attempts)
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._poll_interval = poll_interval
        self._operation_timeout = operation_timeout
        self._session = requests.Session()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(project={self._project!r}, base_url={self._base_url!r})"

    @property
    def project(self) -> str:
        return self._project

    # ---- offers ---------------------------------------------------------------------------

    def standby_offer(self, *, zone: str, machine_type: str, disk_gb: int, spot: bool) -> Offer:
        offer_id = f"{zone}/{machine_type}{':spot' if spot else ''}"
        parse_offer_id(offer_id)
        return Offer(
            provider=self.name,
            offer_id=offer_id,
            host_id=zone,
            gpu_name="CPU",
            num_gpus=0,
            gpu_ram_gb=0,
            price_per_hour=standby_price(machine_type, disk_gb, spot=spot),
            reliability=None,
            region=zone,
            disk_gb=float(disk_gb),
            raw={
                "zone": zone,
                "machine_type": machine_type,
                "spot": spot,
                "price_source": "table" if machine_type in PRICES else "per-vcpu estimate",
            },
        )

    def search_offers(self, query: OfferQuery) -> list[Offer]:
        """Nothing for GPU queries (GCP only rents CPU standbys here); for `gpu_name="CPU"`, the
        table's machine types in the query's zone, cheapest first. No API call."""
        if (query.gpu_name or "").strip().lower() != "cpu" or query.num_gpus not in (None, 0):
            return []
        zone = query.region or DEFAULT_ZONE
        if not re.fullmatch(r"[a-z]+-[a-z]+\d+-[a-z]", zone) or zone in query.exclude_host_ids:
            return []  # a country or a region is not a zone: nothing to rent from
        disk_gb = max(query.min_disk_gb or 0, DEFAULT_DISK_GB)
        offers = [
            self.standby_offer(zone=zone, machine_type=t, disk_gb=disk_gb, spot=query.interruptible)
            for t in PRICES
        ]
        if query.max_price_per_hour is not None:
            offers = [o for o in offers if o.price_per_hour <= query.max_price_per_hour]
        offers.sort(key=lambda o: (o.price_per_hour, o.offer_id))
        return offers[: query.limit]

    # ---- create ---------------------------------------------------------------------------

    def instance_body(self, offer: Offer, launch: LaunchRequest) -> dict[str, Any]:
        """What instances.insert receives for this offer and launch."""
        zone, machine_type, spot = parse_offer_id(offer.offer_id)
        disk_gb = max(int(launch.disk_gb or offer.disk_gb or DEFAULT_DISK_GB), MIN_DISK_GB)
        ssh_keys = "\n".join(f"{METADATA_SSH_USER}:{k.strip()}" for k in launch.ssh_public_keys if k.strip())
        body: dict[str, Any] = {
            "name": instance_name(launch.label, zone),
            "machineType": f"zones/{zone}/machineTypes/{machine_type}",
            "labels": {LABEL_KEY: label_value(launch.label), "managed-by": "dumont"},
            "disks": [
                {
                    "boot": True,
                    "autoDelete": True,
                    "initializeParams": {
                        "sourceImage": BOOT_IMAGE,
                        "diskSizeGb": str(disk_gb),
                        "diskType": f"zones/{zone}/diskTypes/{BOOT_DISK_TYPE}",
                    },
                }
            ],
            "networkInterfaces": [
                {
                    "network": "global/networks/default",
                    "accessConfigs": [{"type": "ONE_TO_ONE_NAT", "name": "External NAT"}],
                }
            ],
            "metadata": {
                "items": [
                    {"key": "enable-guest-attributes", "value": "TRUE"},
                    {"key": "ssh-keys", "value": ssh_keys},
                    {"key": "startup-script", "value": build_startup_script(launch)},
                    {"key": LABEL_KEY, "value": launch.label},
                ]
            },
        }
        if spot:
            body["scheduling"] = {
                "provisioningModel": "SPOT",
                "instanceTerminationAction": "STOP",  # a preempted standby keeps its disk
                "onHostMaintenance": "TERMINATE",
                "automaticRestart": False,
            }
        return body

    def create(self, offer: Offer, launch: LaunchRequest) -> ProviderInstance:
        zone, _, _ = parse_offer_id(offer.offer_id)
        body = self.instance_body(offer, launch)
        name = body["name"]
        # One requestId for this call's retries: GCE answers a resent insert with the first one's
        # operation. Across calls, the name is the guard (409 alreadyExists).
        params = {"requestId": str(uuid.uuid4())}
        try:
            operation = self._call("POST", self._zone_path(zone, "instances"), params=params, json=body)
            self._wait(operation, zone)
        except _AlreadyExists:
            return self._existing(zone, name, launch.label)
        except _StillRunning as exc:
            log.info("GCP: %s; the caller polls the instance", exc)
        except NotFoundError as exc:  # the zone, machine type or image: not an instance of ours
            raise FatalError(str(exc), status_code=exc.status_code, provider=self.name) from None
        instance = self.get(f"{zone}/{name}")
        if instance.status == STATUS_GONE:
            raise RetryableError(
                f"GCP: instance {zone}/{name} was inserted but is not visible", provider=self.name
            )
        return instance

    def _existing(self, zone: str, name: str, label: str) -> ProviderInstance:
        instance = self.get(f"{zone}/{name}")
        if instance.status == STATUS_GONE:
            raise RetryableError(f"GCP: instance {zone}/{name} exists but cannot be read", provider=self.name)
        if _metadata(instance.raw).get(LABEL_KEY) != label:
            raise FatalError(f"GCP: the name {name} in {zone} belongs to another machine", provider=self.name)
        log.info("GCP: instance %s/%s already exists for %s: using it", zone, name, label)
        return instance

    # ---- read -----------------------------------------------------------------------------

    def get(self, instance_id: str) -> ProviderInstance:
        try:
            zone, name = parse_instance_id(instance_id)
            raw = self._call("GET", self._zone_path(zone, f"instances/{name}"))
        except NotFoundError:
            return ProviderInstance(self.name, instance_id, STATUS_GONE, raw_status=None)
        instance = self._instance(raw)
        if instance.status == STATUS_RUNNING:
            instance = dataclasses.replace(instance, ssh_host_key=self._published_host_key(zone, name))
        return instance

    def _published_host_key(self, zone: str, name: str) -> str | None:
        """None until the guest agent has published the host keys (a 404 or no items)."""
        try:
            data = self._call(
                "GET",
                self._zone_path(zone, f"instances/{name}/getGuestAttributes"),
                params={"queryPath": "hostkeys/"},
            )
        except NotFoundError:
            return None
        return _host_key((data.get("queryValue") or {}).get("items") or [])

    def list(self, label_prefix: str = "") -> list[ProviderInstance]:
        """Every instance of the project (one aggregatedList over all zones, paged) whose original
        label starts with `label_prefix`. Host keys are not read here: `get` one to have it."""
        found: list[ProviderInstance] = []
        params: dict[str, Any] = {"maxResults": 500}
        seen_tokens: set[str] = set()
        while True:
            data = self._call("GET", f"projects/{self._project}/aggregated/instances", params=params)
            for scope in (data.get("items") or {}).values():
                for raw in (scope or {}).get("instances") or []:  # a zone with none has a `warning`
                    instance = self._instance(raw)
                    if (instance.label or "").startswith(label_prefix):
                        found.append(instance)
            token = data.get("nextPageToken")
            if not token or token in seen_tokens:
                return found
            seen_tokens.add(token)
            params = {**params, "pageToken": token}

    def _instance(self, raw: dict[str, Any]) -> ProviderInstance:
        zone, name = _last_segment(raw.get("zone")), str(raw.get("name") or "")
        gce_status = raw.get("status")
        status = _STATUS_MAP.get(str(gce_status), STATUS_CREATING)
        interfaces = raw.get("networkInterfaces") or [{}]
        access = (interfaces[0].get("accessConfigs") or [{}])[0]
        nat_ip = access.get("natIP")
        scheduling = raw.get("scheduling") or {}
        spot = scheduling.get("provisioningModel") == "SPOT" or bool(scheduling.get("preemptible"))
        disk_gb = sum(int(d.get("diskSizeGb") or 0) for d in raw.get("disks") or [])
        message = raw.get("statusMessage")
        if status == STATUS_RUNNING and not nat_ip:
            message = message or "no external IP"
        label = _metadata(raw).get(LABEL_KEY) or (raw.get("labels") or {}).get(LABEL_KEY) or name
        return ProviderInstance(
            provider=self.name,
            instance_id=f"{zone}/{name}",
            status=status,
            raw_status=gce_status,
            label=label,
            host_id=zone,
            ssh_host=nat_ip if status == STATUS_RUNNING else None,
            ssh_port=22 if status == STATUS_RUNNING and nat_ip else None,
            ssh_user=SSH_USER,
            price_per_hour=standby_price(_last_segment(raw.get("machineType")), disk_gb, spot=spot),
            started_at=_timestamp(raw.get("lastStartTimestamp")),
            status_message=message,
            raw=raw,
        )

    # ---- lifecycle ------------------------------------------------------------------------

    def destroy(self, instance_id: str) -> None:
        try:
            zone, name = parse_instance_id(instance_id)
            self._wait(self._call("DELETE", self._zone_path(zone, f"instances/{name}")), zone)
        except NotFoundError:
            return  # already gone: that is what we wanted

    def stop(self, instance_id: str) -> None:
        zone, name = parse_instance_id(instance_id)
        self._wait(self._call("POST", self._zone_path(zone, f"instances/{name}/stop")), zone)

    def start(self, instance_id: str) -> None:
        zone, name = parse_instance_id(instance_id)
        self._wait(self._call("POST", self._zone_path(zone, f"instances/{name}/start")), zone)

    # ---- operations -----------------------------------------------------------------------

    def _wait(self, operation: dict[str, Any], zone: str) -> dict[str, Any]:
        """Poll a zone operation (zoneOperations.get) until DONE; raise what its `error` says.

        Not zoneOperations.wait: that holds the request open up to two minutes, past our timeout."""
        deadline = time.monotonic() + self._operation_timeout
        name = str(operation.get("name") or "")
        while operation.get("status") != "DONE":
            if not _OPERATION.match(name):
                raise FatalError(f"GCP: unexpected operation {operation!r:.200}", provider=self.name)
            if time.monotonic() >= deadline:
                raise _StillRunning(
                    f"GCP: operation {name} ({operation.get('operationType')}) not done after "
                    f"{self._operation_timeout:.0f}s",
                    provider=self.name,
                )
            time.sleep(self._poll_interval)
            operation = self._call("GET", self._zone_path(zone, f"operations/{name}"))
        error = self._operation_error(operation)
        if error is not None:
            raise error
        return operation

    def _operation_error(self, operation: dict[str, Any]) -> ProviderError | None:
        errors = [e for e in (operation.get("error") or {}).get("errors") or [] if isinstance(e, dict)]
        if not errors:
            return None
        codes = {_norm(e.get("code")) for e in errors}
        http = operation.get("httpErrorStatusCode")
        text = self._redact(
            f"GCP {operation.get('operationType')} {_last_segment(operation.get('targetLink'))}: "
            + "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors)
        )
        cls: type[ProviderError] = FatalError
        if codes & _CAPACITY:
            cls = CapacityError
        elif codes & _DENIED or http in (401, 403):
            cls = AuthError
        elif codes & _NOT_FOUND:
            cls = NotFoundError
        elif codes & _RATE_LIMITED or (isinstance(http, int) and http in RETRYABLE_STATUS):
            cls = RetryableError
        return cls(text, status_code=http if isinstance(http, int) else None, provider=self.name)

    # ---- transport ------------------------------------------------------------------------

    def _zone_path(self, zone: str, rest: str) -> str:
        return f"projects/{self._project}/zones/{zone}/{rest}"

    def _access_token(self) -> str:
        """The cached token, refreshed (a JWT grant at the key's token_uri) when near expiry."""
        with self._token_lock:
            if self._credentials.token_state != TokenState.FRESH:
                self._refresh_token()
            return str(self._credentials.token)

    def _refresh_token(self) -> None:
        failure: ProviderError | None = None
        try:
            self._credentials.refresh(self._token_transport)
        except google.auth.exceptions.RefreshError as exc:
            # args[0] is "error: description" (the token endpoint's words); the rest may be a body.
            detail = str(exc.args[0] if exc.args else "refused")[:300]
            cls = RetryableError if exc.retryable else AuthError
            failure = cls(self._redact(f"GCP token for {self._client_email}: {detail}"), provider=self.name)
        except google.auth.exceptions.TransportError as exc:
            cause = exc.args[0] if exc.args else exc
            failure = RetryableError(
                f"GCP token for {self._client_email}: {type(cause).__name__}", provider=self.name
            )
        except google.auth.exceptions.GoogleAuthError as exc:
            failure = AuthError(
                f"GCP token for {self._client_email}: {type(exc).__name__}", provider=self.name
            )
        if failure is not None:  # raised outside the except blocks: no context carrying the grant
            raise failure

    def _forget_token(self, token: str) -> None:
        """Mark the token expired (kept until replaced, so echoes of it are still redacted)."""
        with self._token_lock:
            if self._credentials.token == token:
                self._credentials.expiry = datetime.datetime(1970, 1, 1)

    def _retrying(self) -> tenacity.Retrying:
        return tenacity.Retrying(
            retry=tenacity.retry_if_exception(
                lambda e: isinstance(e, RetryableError) and not isinstance(e, _StillRunning)
            ),
            stop=tenacity.stop_after_attempt(self._max_attempts),
            wait=tenacity.wait_exponential_jitter(
                multiplier=self._backoff_initial, max=self._backoff_max, jitter=self._backoff_initial
            ),
            before_sleep=lambda state: log.info(
                "GCP: retrying after %s (attempt %d)", state.outcome.exception(), state.attempt_number
            ),
            reraise=True,
        )

    def _call(
        self, method: str, path: str, *, params: dict[str, Any] | None = None, json: Any = None
    ) -> dict[str, Any]:
        """One API call, retried with backoff on RetryableError; the last error is raised."""
        for attempt in self._retrying():
            with attempt:
                return self._request(method, path, params=params, json=json)
        raise AssertionError("unreachable")  # tenacity re-raises on the last attempt

    def _request(self, method: str, path: str, *, params: dict[str, Any] | None, json: Any) -> dict[str, Any]:
        url = self._base_url + path
        for first_try in (True, False):
            token = self._access_token()
            failure: str | None = None
            try:
                response = self._session.request(
                    method,
                    url,
                    params=params,
                    json=json,
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=self._timeout,
                )
            except requests.RequestException as exc:
                # Built outside the except block: the exception holds the request and its header.
                failure = f"GCP {method} {path}: {type(exc).__name__}"
            if failure is not None:
                raise RetryableError(failure, provider=self.name)
            log.debug("GCP %s %s -> %s", method, path, response.status_code)
            if response.status_code == 401 and first_try:
                self._forget_token(token)  # revoked or expired early: one fresh token, once
                continue
            return self._decode(method, path, response)
        raise AssertionError("unreachable")

    def _decode(self, method: str, path: str, response: requests.Response) -> dict[str, Any]:
        status = response.status_code
        try:
            data = response.json()
        except ValueError:
            data = None
        if 200 <= status < 300:
            if not isinstance(data, dict):
                raise FatalError(f"GCP {method} {path}: HTTP {status}: not a JSON object", provider=self.name)
            return data
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, dict):
            reasons = [str(e.get("reason")) for e in error.get("errors") or [] if isinstance(e, dict)]
            message = str(error.get("message") or error.get("status") or "")
        else:
            reasons, message = [], response.text[:300].strip()
        words = {_norm(r) for r in reasons}
        reason = f" {','.join(reasons)}" if reasons else ""
        text = self._redact(f"GCP {method} {urllib.parse.unquote(path)}: HTTP {status}{reason}: {message}")
        cls: type[ProviderError] = FatalError
        if words & _CAPACITY:
            cls = CapacityError
        elif status in RETRYABLE_STATUS or words & (_RATE_LIMITED | _NOT_READY):
            cls = RetryableError
        elif status in (401, 403):
            cls = AuthError
        elif status == 404:
            cls = NotFoundError
        elif status == 409 and "alreadyexists" in words:
            cls = _AlreadyExists
        raise cls(text, status_code=status, provider=self.name)

    def _redact(self, text: str) -> str:
        token = self._credentials.token
        return text.replace(token, "***") if token else text


def _metadata(raw: dict[str, Any]) -> dict[str, str]:
    items = (raw.get("metadata") or {}).get("items") or []
    return {str(i.get("key")): str(i.get("value")) for i in items if isinstance(i, dict)}
