"""The end-to-end stack: a real local marketplace and real Celery processes, shared by a test module.

A module sets `STACK_SETTINGS = {...}` to shorten timings for its tests; those settings apply both to
the subprocesses (as environment variables) and to the test process (override_settings). A module that
sets `STACK_SERVICES = {"s3", "web", "beat"}` also gets a real S3 server (snapshots), the web server
(gunicorn: agents post their heartbeats to it) and celery beat (the periodic sweeps).
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
from pathlib import Path

import pytest
from django.test import override_settings

from dumont.bench.marketplace import MarketplaceHandle, running_marketplace
from dumont.s3server import Credentials, start_s3_server
from tests.harness import celery_beat, celery_worker, free_port, subprocess_env, web_server

CATALOGUES = Path(__file__).parent / "catalogues"


@dataclasses.dataclass
class Stack:
    market: MarketplaceHandle
    tmp: Path
    env: dict[str, str]
    web_url: str | None = None

    def machines(self, label_prefix: str) -> list[dict]:
        """The marketplace's live machines whose label starts with `label_prefix`."""
        return [
            m for m in self.market.control.state()["instances"]
            if m["status"] != "destroyed" and (m.get("label") or "").startswith(label_prefix)
        ]


def _s3_settings(stack: contextlib.ExitStack, tmp: Path) -> dict:
    admin = Credentials(f"e2e-{secrets.token_hex(4)}", secrets.token_hex(20))
    scope_secret = secrets.token_hex(20)
    server = start_s3_server(tmp / "s3", admin=admin, scope_secret=scope_secret)
    stack.callback(server.stop)
    return {
        "SNAPSHOT_S3_ENDPOINT": server.endpoint, "SNAPSHOT_FAST_S3_ENDPOINT": server.fast_endpoint,
        "SNAPSHOT_S3_BUCKET": "dumont-e2e", "SNAPSHOT_S3_REGION": "auto",
        "SNAPSHOT_S3_ACCESS_KEY_ID": admin.access_key_id, "SNAPSHOT_S3_SECRET_ACCESS_KEY": admin.secret_access_key,
        "SNAPSHOT_MACHINE_CREDENTIALS": "scoped", "SNAPSHOT_S3_SCOPE_SECRET": scope_secret,
        "SNAPSHOT_RESTIC_CONNECTIONS": 8,
    }


@pytest.fixture(scope="module")
def stack_base(request, django_db_setup, tmp_path_factory):
    module_settings = getattr(request.module, "STACK_SETTINGS", {})
    services = getattr(request.module, "STACK_SERVICES", set())
    catalogue = getattr(request.module, "STACK_CATALOGUE", CATALOGUES / "race.yaml")
    market_env = getattr(request.module, "STACK_MARKET_ENV", {})  # the marketplace process's environment
    tmp = tmp_path_factory.mktemp("stack")
    with contextlib.ExitStack() as stack:
        market = stack.enter_context(running_marketplace(tmp, time_scale=1.0, catalogue=catalogue,
                                                        env=market_env))
        overrides = {
            "LOCAL_MARKETPLACE_ENABLED": True,
            "LOCAL_MARKETPLACE_URL": market.url,
            "DUMONT_DATA_DIR": tmp / "data",
            "DUMONT_SSH_KEY_PATH": tmp / "ssh" / "id_ed25519",
            # agents post nowhere unless the module runs the web server
            "AGENT_CONTROL_PLANE_URL": "http://127.0.0.1:9",
            # no fast-path presync after periodic syncs unless the module tests it (test_hibernation): one on a
            # machine a fault freezes would hold a worker slot until its command timeout
            "SNAPSHOT_FASTPATH_PRESYNC_SECONDS": 0,
        }
        web_port = free_port() if "web" in services else None
        if web_port:
            overrides["AGENT_CONTROL_PLANE_URL"] = f"http://127.0.0.1:{web_port}"
        if "s3" in services:
            overrides.update(_s3_settings(stack, tmp))
        overrides.update(module_settings)
        stack.enter_context(override_settings(**overrides))
        env = subprocess_env(**{name: str(value) for name, value in overrides.items()})
        web_url = stack.enter_context(web_server(tmp, env=env, port=web_port)) if web_port else None
        if "beat" in services:
            stack.enter_context(celery_beat(tmp, env=env))
        yield Stack(market=market, tmp=tmp, env=env, web_url=web_url)


@pytest.fixture(scope="module")
def stack(stack_base):
    with celery_worker(stack_base.tmp, env=stack_base.env, concurrency=3):
        yield stack_base
