"""The heartbeat ingest tier (gunicorn with uvicorn workers, dumont.asgi) answers like the API's server:
signed heartbeats are stored, forged ones refused, health is local, everything else is Django's."""

import json
import urllib.error
import urllib.request

import pytest

from agent import services
from agent.models import Heartbeat
from agent.services import agent_credential_issue
from tests.agent.conftest import STATUS_URL, reading, signed
from tests.factories import make_instance, make_user
from tests.harness import subprocess_env, web_server

pytestmark = pytest.mark.django_db(transaction=True)


def send(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None):
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (loopback)
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def as_http(meta: dict[str, str]) -> dict[str, str]:
    """Django test-client META names -> HTTP header names."""
    return {key[5:].replace("_", "-").title(): value for key, value in meta.items()}


def test_the_ingest_tier_stores_signed_heartbeats_and_refuses_forged_ones(tmp_path):
    instance = make_instance(make_user(), status="running")
    secret = agent_credential_issue(instance.pk)
    with web_server(tmp_path, env=subprocess_env(), ingest=True) as url:
        assert send(f"{url}/api/v1/health") == (200, {"status": "ok"})
        raw, meta = signed(instance.pk, secret, reading(gpu_util=12.5))
        headers = {"Content-Type": "application/json", **as_http(meta)}
        assert send(url + STATUS_URL, "POST", raw, headers) == (200, {"action": "none", "interval": 10})
        assert send(url + STATUS_URL, "POST", raw, headers)[0] == 401  # the same nonce again
        forged, forged_meta = signed(instance.pk, "not-the-secret", reading(gpu_util=0.0))
        status, answer = send(url + STATUS_URL, "POST", forged, {"Content-Type": "application/json",
                                                                 **as_http(forged_meta)})
        assert (status, answer["error"]) == (401, "not_authenticated")
        bad, bad_meta = signed(instance.pk, secret, reading(gpu_util="lots"))
        status, answer = send(url + STATUS_URL, "POST", bad, {"Content-Type": "application/json",
                                                              **as_http(bad_meta)})
        assert status == 400 and "gpu_util" in answer["fields"]
        # anything else is Django's, JWT and all
        status, answer = send(f"{url}/api/v1/instances")
        assert (status, answer["error"]) == (401, "not_authenticated")
    assert services.heartbeats_flush() == 1
    assert list(Heartbeat.objects.values_list("gpu_util", flat=True)) == [12.5]
