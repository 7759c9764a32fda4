"""Client for the marketplace's control endpoints (/_market/...), used by tests, demos and the CLI."""

from __future__ import annotations

from typing import Any

import requests


class MarketplaceError(RuntimeError):
    pass


class MarketplaceControl:
    def __init__(self, base_url: str, timeout: float = 30):
        # Accepts the server root or the vast API base (".../api/v0/") alike.
        root = base_url.rstrip("/")
        if root.endswith("/api/v0"):
            root = root[: -len("/api/v0")]
        self.url = root
        self.timeout = timeout
        self._session = requests.Session()

    def __repr__(self) -> str:
        return f"MarketplaceControl({self.url!r})"

    def health(self) -> dict[str, Any]:
        return self._call("GET", "health/")

    def state(self) -> dict[str, Any]:
        return self._call("GET", "state/")

    def hosts(self) -> list[dict[str, Any]]:
        return self._call("GET", "hosts/")["hosts"]

    def instance(self, instance_id: int | str) -> dict[str, Any]:
        """The control-side view of one rental (status, fate, machine_dir, workspace, billing...)."""
        for item in self.state()["instances"]:
            if str(item["id"]) == str(instance_id):
                return item
        raise MarketplaceError(f"no instance {instance_id}")

    def set_host(self, name: str, **changes: Any) -> dict[str, Any]:
        """E.g. set_host("fast-4090-us", boot_median=2, boot_sigma=0, p_exited=0.5)."""
        return self._call("POST", f"hosts/{name}/", changes)

    def set_faults(self, **changes: Any) -> dict[str, Any]:
        """rate_429, rate_500, rate_slow, slow_seconds, min_gap_s, next=[429, {"fault": "slow", "match": "PUT /asks/"}]."""
        return self._call("POST", "faults/", changes)

    def clear_faults(self) -> dict[str, Any]:
        return self.set_faults(rate_429=0.0, rate_500=0.0, rate_slow=0.0, min_gap_s=0.0, next=[])

    def set_time_scale(self, time_scale: float) -> None:
        self._call("POST", "time_scale/", {"time_scale": time_scale})

    def set_gpu_util(self, instance_id: int | str, gpu_util: float) -> None:
        self._call("POST", f"instances/{instance_id}/gpu_util/", {"gpu_util": gpu_util})

    def crash(self, instance_id: int | str) -> None:
        self._call("POST", f"instances/{instance_id}/crash/")

    def partition(self, instance_id: int | str, on: bool = True) -> None:
        """The machine runs on, but neither its SSH nor its agent reaches the control plane (on=False heals)."""
        self._call("POST", f"instances/{instance_id}/partition/", {"on": on})

    def partition_all(self, on: bool = True) -> list[int]:
        """Our own network down: every running machine partitioned at once (on=False heals them all)."""
        return self._call("POST", "partition_all/", {"on": on})["partitioned"]

    def host_stop(self, instance_id: int | str) -> None:
        """The provider stops the machine on its own (a host maintenance); its disk is kept."""
        self._call("POST", f"instances/{instance_id}/host_stop/")

    def destroy_all(self) -> list[int]:
        return self._call("POST", "destroy_all/")["destroyed"]

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = self._session.request(
            method, f"{self.url}/_market/{path}", json=body if body is not None else {}, timeout=self.timeout
        )
        try:
            data = response.json()
        except ValueError:
            data = None
        if response.status_code >= 400:
            msg = data.get("msg") if isinstance(data, dict) else response.text
            raise MarketplaceError(f"{method} /_market/{path}: HTTP {response.status_code}: {msg}")
        return data
