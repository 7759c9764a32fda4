"""The `local` provider: the vast.ai adapter, pointed at the local marketplace (no account needed)."""

from __future__ import annotations

from typing import Any

from machines.providers.base import CapacityError, Offer, OfferQuery, register_provider
from machines.providers.vastai import VastAIProvider


@register_provider("local")
class LocalProvider(VastAIProvider):
    def __init__(
        self, base_url: str, api_key: str = "local", timeout: float = 10, max_attempts: int = 5, **kwargs: Any
    ):
        # Accepts the server root ("http://127.0.0.1:8790") or the API base (".../api/v0/").
        root = base_url.rstrip("/")
        if not root.endswith("/api/v0"):
            root += "/api/v0"
        super().__init__(
            api_key or "local", base_url=root + "/", timeout=timeout, max_attempts=max_attempts, **kwargs
        )

    def standby_offer(self, *, zone: str, machine_type: str, disk_gb: int, spot: bool) -> Offer:
        """The marketplace's cheapest CPU-only offer (gpu_name "CPU"); zone, machine type and spot are
        GCP notions this marketplace ignores."""
        offers = self.search_offers(OfferQuery(gpu_name="CPU", num_gpus=0, min_disk_gb=disk_gb, limit=1))
        if not offers:
            raise CapacityError("no CPU-only offer on the local marketplace", provider=self.name)
        return offers[0]
