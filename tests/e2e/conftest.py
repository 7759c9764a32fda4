"""The end-to-end stack: a real local marketplace and a real Celery worker, shared by a test module.

A module sets `STACK_SETTINGS = {...}` to shorten the race for its tests; those settings apply both to
the worker subprocess (as environment variables) and to the test process (override_settings).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from django.test import override_settings

from machines.providers.local.testing import MarketplaceHandle, running_marketplace
from tests.harness import celery_worker, subprocess_env

CATALOGUES = Path(__file__).parent / "catalogues"


@dataclasses.dataclass
class Stack:
    market: MarketplaceHandle
    tmp: Path
    env: dict[str, str]

    def machines(self, label_prefix: str) -> list[dict]:
        """The marketplace's live machines whose label starts with `label_prefix`."""
        return [
            m for m in self.market.control.state()["instances"]
            if m["status"] != "destroyed" and (m.get("label") or "").startswith(label_prefix)
        ]


@pytest.fixture(scope="module")
def stack_base(request, django_db_setup, tmp_path_factory):
    module_settings = getattr(request.module, "STACK_SETTINGS", {})
    catalogue = getattr(request.module, "STACK_CATALOGUE", CATALOGUES / "race.yaml")
    tmp = tmp_path_factory.mktemp("stack")
    with running_marketplace(tmp, time_scale=1.0, catalogue=catalogue) as market:
        overrides = {
            "LOCAL_MARKETPLACE_ENABLED": True,
            "LOCAL_MARKETPLACE_URL": market.url,
            "DUMONT_SSH_KEY_PATH": tmp / "ssh" / "id_ed25519",
            **module_settings,
        }
        with override_settings(**overrides):
            env = subprocess_env(**{name: str(value) for name, value in overrides.items()})
            yield Stack(market=market, tmp=tmp, env=env)


@pytest.fixture(scope="module")
def stack(stack_base):
    with celery_worker(stack_base.tmp, env=stack_base.env, concurrency=3):
        yield stack_base
