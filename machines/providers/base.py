"""The provider interface: plain dataclasses at the boundary, typed errors, a registry.

Providers import nothing of the domain (no Django models): the rest of the code asks the
registry (`get_provider`) for an adapter and talks to it in these dataclasses only.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from decimal import Decimal
from typing import Any, ClassVar

# Provider-side lifecycle, normalised. vast.ai's `actual_status` values map onto these.
STATUS_CREATING = "creating"  # null / created / loading / rebooting / scheduling
STATUS_RUNNING = "running"
STATUS_STOPPED = "stopped"  # stopped / frozen (can be started again)
STATUS_FAILED = "failed"  # exited / unknown / offline: never becomes running, destroy it
STATUS_GONE = "gone"  # destroyed / no such instance
PROVIDER_STATUSES = (STATUS_CREATING, STATUS_RUNNING, STATUS_STOPPED, STATUS_FAILED, STATUS_GONE)


@dataclasses.dataclass(frozen=True)
class OfferQuery:
    """What the user asked for; every field is a filter, None means "any"."""

    gpu_name: str | None = None
    num_gpus: int | None = None
    max_price_per_hour: Decimal | None = None
    region: str | None = None  # ISO country code or provider region, matched as a prefix
    min_disk_gb: int | None = None
    min_reliability: float | None = None
    exclude_host_ids: tuple[str, ...] = ()
    interruptible: bool = False
    limit: int = 64


@dataclasses.dataclass(frozen=True)
class Offer:
    provider: str
    offer_id: str  # what you rent (vast: the ask id)
    host_id: str  # the physical machine: our reliability key (vast: machine_id)
    gpu_name: str
    num_gpus: int
    gpu_ram_gb: float
    price_per_hour: Decimal  # $/h all-in (vast: dph_total)
    reliability: float | None  # the provider's own 0..1 score
    region: str
    disk_gb: float
    inet_down_mbps: float | None = None
    raw: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)


@dataclasses.dataclass(frozen=True)
class LaunchRequest:
    """Everything a create needs besides the offer. `label` carries our own id (orphan search)."""

    label: str
    image: str
    disk_gb: int
    ssh_public_keys: tuple[str, ...]  # the control plane's key first, then the owner's keys
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    onstart: str = ""  # extra shell run at boot, after the keys are installed
    interruptible: bool = False


@dataclasses.dataclass(frozen=True)
class ProviderInstance:
    provider: str
    instance_id: str
    status: str  # one of PROVIDER_STATUSES
    raw_status: str | None  # the provider's own word, for events and debugging
    label: str | None = None
    host_id: str | None = None
    ssh_host: str | None = None
    ssh_port: int | None = None
    ssh_user: str = "root"
    ssh_host_key: str | None = None  # "ssh-ed25519 AAAA..." when the provider reports one
    price_per_hour: Decimal | None = None
    gpu_util: float | None = None
    started_at: float | None = None  # unix time the provider reports the machine started
    status_message: str | None = None
    # the provider says the failure is its own platform's, not the host's (the local marketplace could not
    # start sshd, ...): every other machine would fail the same way, so a race stops instead of renting more
    platform_fault: bool = False
    raw: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @property
    def ssh_ready(self) -> bool:
        return self.status == STATUS_RUNNING and bool(self.ssh_host) and bool(self.ssh_port)


# ---- errors -------------------------------------------------------------------------------


class ProviderError(Exception):
    """Base of every provider failure. `retryable` says whether the same call may succeed later."""

    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, status_code: int | None = None, provider: str | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.provider = provider


class RetryableError(ProviderError):
    """429, 5xx, timeouts, connection errors: retried with backoff, then surfaced."""

    retryable = True


class CapacityError(ProviderError):
    """The offer is gone / no capacity for this request: try another offer."""


class AuthError(ProviderError):
    """The API key is missing, wrong or lacks permission."""


class NotFoundError(ProviderError):
    """The instance does not exist (destroy treats this as success)."""


class FatalError(ProviderError):
    """Anything else the provider refused (bad arguments, ...): do not retry."""


# ---- interface ----------------------------------------------------------------------------


class Provider(abc.ABC):
    """One adapter per marketplace. Every method has a timeout and raises ProviderError subclasses."""

    name: ClassVar[str]
    supports_stop: ClassVar[bool] = True

    @abc.abstractmethod
    def search_offers(self, query: OfferQuery) -> list[Offer]: ...

    @abc.abstractmethod
    def create(self, offer: Offer, launch: LaunchRequest) -> ProviderInstance: ...

    @abc.abstractmethod
    def get(self, instance_id: str) -> ProviderInstance:
        """Current state; a destroyed instance comes back with status STATUS_GONE (not an error)."""

    @abc.abstractmethod
    def list(self, label_prefix: str = "") -> list[ProviderInstance]:
        """Every instance of this account whose label starts with `label_prefix`."""

    @abc.abstractmethod
    def destroy(self, instance_id: str) -> None:
        """Idempotent: an instance already gone is a success."""

    def standby_offer(self, *, zone: str, machine_type: str, disk_gb: int, spot: bool) -> Offer:
        """The offer a CPU standby machine is rented from (a machine that mirrors a GPU workspace).

        GCP: `machine_type` in `zone`, priced from the adapter's table. A marketplace: its cheapest
        CPU-only offer (zone and machine type are hints it may ignore). CapacityError when none.
        """
        raise FatalError(f"{self.name} does not rent CPU standby machines", provider=self.name)

    def stop(self, instance_id: str) -> None:
        raise FatalError(f"{self.name} cannot stop instances", provider=self.name)

    def start(self, instance_id: str) -> None:
        raise FatalError(f"{self.name} cannot start instances", provider=self.name)


_REGISTRY: dict[str, type[Provider]] = {}


def register_provider(name: str) -> Callable[[type[Provider]], type[Provider]]:
    def decorate(cls: type[Provider]) -> type[Provider]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def provider_names() -> list[str]:
    return sorted(_REGISTRY)


def get_provider(name: str, **options: Any) -> Provider:
    """An adapter by name. `options` are the adapter's constructor arguments (api_key, base_url, ...)."""
    from machines import providers  # noqa: F401  (importing the package registers every adapter)

    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise FatalError(f"unknown provider {name!r}; known: {', '.join(provider_names())}") from None
    return cls(**options)
