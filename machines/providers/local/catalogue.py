"""Hosts of the local marketplace: what they offer and how they behave (see catalogue.yaml)."""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CATALOGUE = Path(__file__).with_name("catalogue.yaml")

# What a rental turns out to be, drawn once at create from the host's probabilities.
FATE_OK = "ok"
FATE_STUCK = "stuck_loading"  # stays "loading" forever
FATE_EXITED = "exited"  # reaches its boot time, then reports "exited"
FATE_SSH_DEAD = "ssh_never_answers"  # reports "running", its SSH port accepts and never speaks


@dataclasses.dataclass
class HostSpec:
    name: str
    machine_id: int
    gpu_name: str
    gpu_ram_gb: float
    price_per_hour: float
    region: str
    num_gpus: int = 1
    capacity: int = 3
    reliability: float = 0.97
    verified: bool = True
    disk_gb: float = 200
    cpu_cores: int = 16
    cpu_ram_gb: float = 64
    inet_down_mbps: float = 900
    storage_cost: float = 0.15
    min_bid_ratio: float = 0.5
    boot_median: float = 20.0
    boot_sigma: float = 0.3
    p_stuck_loading: float = 0.0
    p_exited: float = 0.0
    p_ssh_never_answers: float = 0.0

    @property
    def ask_id(self) -> int:
        return self.machine_id * 10

    @classmethod
    def from_dict(cls, data: dict[str, Any], defaults: dict[str, Any] | None = None) -> HostSpec:
        merged = {**(defaults or {}), **data}
        boot = merged.pop("boot", None) or {}
        merged.setdefault("boot_median", boot.get("median", cls.boot_median))
        merged.setdefault("boot_sigma", boot.get("sigma", cls.boot_sigma))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(merged) - known
        if unknown:
            raise ValueError(f"host {merged.get('name')!r}: unknown fields {sorted(unknown)}")
        spec = cls(**merged)
        spec.validate()
        return spec

    def updated(self, changes: dict[str, Any]) -> HostSpec:
        """A copy with `changes` applied (the control endpoint's set-host)."""
        data = dataclasses.asdict(self)
        if "boot" in changes:
            boot = changes.pop("boot") or {}
            changes = {"boot_median": boot.get("median"), "boot_sigma": boot.get("sigma"), **changes}
        unknown = set(changes) - set(data) - {"name", "machine_id"}
        if unknown:
            raise ValueError(f"unknown host fields {sorted(unknown)}")
        for key in ("name", "machine_id"):  # identity cannot change: instances refer to it
            changes.pop(key, None)
        data.update({k: v for k, v in changes.items() if v is not None})
        spec = HostSpec(**data)
        spec.validate()
        return spec

    def validate(self) -> None:
        for p in ("p_stuck_loading", "p_exited", "p_ssh_never_answers", "reliability"):
            if not 0.0 <= float(getattr(self, p)) <= 1.0:
                raise ValueError(f"host {self.name}: {p} must be within 0..1")
        if self.p_stuck_loading + self.p_exited + self.p_ssh_never_answers > 1.0:
            raise ValueError(f"host {self.name}: failure probabilities add up to more than 1")
        if self.boot_median < 0 or self.boot_sigma < 0 or self.capacity < 0:
            raise ValueError(f"host {self.name}: boot_median, boot_sigma and capacity must be >= 0")

    def sample_boot_seconds(self, rng: random.Random) -> float:
        if self.boot_sigma == 0 or self.boot_median == 0:
            return self.boot_median
        return rng.lognormvariate(math.log(self.boot_median), self.boot_sigma)

    def sample_fate(self, rng: random.Random) -> str:
        roll = rng.random()
        for fate, p in (
            (FATE_STUCK, self.p_stuck_loading),
            (FATE_EXITED, self.p_exited),
            (FATE_SSH_DEAD, self.p_ssh_never_answers),
        ):
            if roll < p:
                return fate
            roll -= p
        return FATE_OK

    def offer_json(self, *, free_slots: int, interruptible: bool) -> dict[str, Any]:
        """The offer as vast.ai's /bundles/ reports it (RAM in MB)."""
        return {
            "id": self.ask_id,
            "ask_contract_id": self.ask_id,
            "machine_id": self.machine_id,
            "host_id": 90000 + self.machine_id % 1000,
            "gpu_name": self.gpu_name,
            "num_gpus": self.num_gpus,
            "gpu_ram": int(self.gpu_ram_gb * 1024),
            "gpu_total_ram": int(self.gpu_ram_gb * 1024 * self.num_gpus),
            "cpu_cores": self.cpu_cores,
            "cpu_cores_effective": self.cpu_cores,
            "cpu_ram": int(self.cpu_ram_gb * 1024),
            "disk_space": self.disk_gb,
            "dph_total": self.price_per_hour,
            "dph_base": self.price_per_hour,
            "min_bid": round(self.price_per_hour * self.min_bid_ratio, 4),
            "storage_cost": self.storage_cost,
            "reliability": self.reliability,
            "reliability2": self.reliability,
            "verification": "verified" if self.verified else "unverified",
            "verified": self.verified,
            "rentable": free_slots > 0,
            "rented": False,
            "is_bid": interruptible,
            "inet_down": self.inet_down_mbps,
            "inet_up": self.inet_down_mbps / 2,
            "geolocation": self.region,
            "direct_port_count": 8,
            "cuda_max_good": 12.4 if self.num_gpus else 0.0,
            "public_ipaddr": "127.0.0.1",
            "external": False,
            "hosting_type": 0,
        }


def load_catalogue(path: Path | str | None = None) -> list[HostSpec]:
    data = yaml.safe_load(Path(path or DEFAULT_CATALOGUE).read_text()) or {}
    defaults = data.get("defaults") or {}
    hosts = [HostSpec.from_dict(h, defaults) for h in data.get("hosts") or []]
    names = [h.name for h in hosts]
    ids = [h.machine_id for h in hosts]
    if len(set(names)) != len(names) or len(set(ids)) != len(ids):
        raise ValueError("catalogue: host names and machine_ids must be unique")
    return hosts
