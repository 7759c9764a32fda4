"""Helpers for the agent tests: signed heartbeats, a clean Redis namespace, credentials."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import pytest

from agent import buffer, mirror
from agent.daemon.dumont_agent import signature
from agent.services import agent_credential_issue
from tests.factories import make_instance, make_user

STATUS_URL = "/api/v1/agent/status"


def reading(**fields: Any) -> dict[str, Any]:
    body = {"gpu_util": 37.5, "gpus": [{"index": 0, "util": 37.5, "mem_used_mb": 1024, "mem_total_mb": 24576,
                                        "temp_c": 51}],
            "gpu_source": "nvml", "gpu_error": None, "time": time.time(), "state": "running", "sync": None,
            "agent_version": "1"}
    body.update(fields)
    return body


def signed(instance_id: int, secret: str, body: dict | bytes, *, timestamp: float | None = None,
           nonce: str | None = None, header_instance: int | None = None,
           path: str = STATUS_URL) -> tuple[bytes, dict[str, str]]:
    """The body bytes and the headers (as Django test-client META) a DumontAgent would send."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    ts = str(int(time.time() if timestamp is None else timestamp))
    nonce = nonce or os.urandom(16).hex()
    headers = {
        "HTTP_X_DUMONT_INSTANCE": str(instance_id if header_instance is None else header_instance),
        "HTTP_X_DUMONT_TIMESTAMP": ts,
        "HTTP_X_DUMONT_NONCE": nonce,
        "HTTP_X_DUMONT_SIGNATURE": signature(secret, instance_id, ts, nonce, raw, path=path),
    }
    return raw, headers


def post(client, raw: bytes, headers: dict[str, str]):
    return client.post(STATUS_URL, data=raw, content_type="application/json", **headers)


def agent_keys() -> list[bytes]:
    return sorted(buffer.client().scan_iter(match=buffer.key("*")))


@pytest.fixture(autouse=True)
def _empty_agent_redis():
    """Each test starts with no agent state in this worker's Redis namespace (mirror included)."""
    keys = agent_keys() + list(buffer.client().scan_iter(match=mirror._key("*")))
    if keys:
        buffer.client().delete(*keys)


@pytest.fixture
def running(db):
    """A running instance with an agent credential: (instance, secret)."""
    instance = make_instance(make_user(), status="running")
    return instance, agent_credential_issue(instance.pk)
