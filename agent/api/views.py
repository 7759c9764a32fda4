"""The agents' endpoint and the public health check: plain Django views, no DRF and no JWT.

Agents are not users: they authenticate each heartbeat with their instance's HMAC secret
(agent.auth), and the hot path avoids DRF's request/serializer machinery, which would cost more than
the rest of the work together. In production `POST /api/v1/agent/status` does not even reach Django's
middleware and URL resolver: dumont.wsgi sends it to agent.api.wsgi, which answers with the same
`status_answer` as the view here (the view serves the test client and any other WSGI entry point).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from agent import services
from agent.api.payload import heartbeat_parse
from agent.auth import authenticate
from agent.buffer import RateLimited
from agent.conf import settings
from agent.daemon.dumont_agent import STATUS_PATH, SYNC_CREDENTIALS_PATH
from dumont.core.errors import DomainError, ServiceUnavailable

TOO_LARGE = (413, {"error": "too_large", "detail": "The heartbeat is too large."})
# Redis down, not accepted: the agent retries with backoff rather than lose the heartbeat silently
UNAVAILABLE = (ServiceUnavailable.http_status, ServiceUnavailable().body())


def status_answer(meta: dict[str, Any], read_body: Callable[[], bytes]) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON answer) for a heartbeat: `{"action": "none" | "prepare_hibernate" |
    "shutdown", "interval": s}` when accepted; a 429 (more than the instance's interval allows, nothing
    stored) carries `retry_after`, which both entry points also send as the `Retry-After` header.
    `meta`: the WSGI environ; `read_body`: its exact bytes (what was signed), read only once the size is
    known to be acceptable."""
    # whole microseconds: Redis's copy (Python's datetime) and PostgreSQL's (to_timestamp) then read the same
    # instant; a float between two microseconds was rounded one way by each
    received_at = round(time.time(), 6)
    if int(meta.get("CONTENT_LENGTH") or 0) > settings.AGENT_MAX_BODY_BYTES:
        return TOO_LARGE
    body = read_body()
    try:
        agent = authenticate(meta, body, path=STATUS_PATH)
        heartbeat = heartbeat_parse(body)
        return 200, services.heartbeat_record(agent=agent, heartbeat=heartbeat, received_at=received_at)
    except DomainError as exc:  # failed authentication or a replay (401), bad input (400)
        return exc.http_status, exc.body()
    except RateLimited as exc:
        return 429, {"error": "throttled", "detail": "More heartbeats than the interval allows.",
                     "retry_after": exc.retry_after}
    except redis.RedisError:
        return UNAVAILABLE


@csrf_exempt  # no cookies are involved: every request carries its own signature
@require_POST
def agent_status(request: HttpRequest) -> JsonResponse:
    """A DumontAgent heartbeat (see status_answer)."""
    status, answer = status_answer(request.META, lambda: request.body)
    response = JsonResponse(answer, status=status)
    if status == 429:
        response["Retry-After"] = str(answer["retry_after"])
    return response


@csrf_exempt
@require_POST
def sync_credentials(request: HttpRequest) -> JsonResponse:
    """Fresh storage keys for the agent's sync, before its own expire (`r2` keys are temporary). Signed
    like a heartbeat (any body; its nonce used once); answers `{"env": {AWS_...}, "expires_at": t | null}`
    for the instance's owner's repository prefix only. The repository password never travels here."""
    try:
        agent = authenticate(request.META, request.body, path=SYNC_CREDENTIALS_PATH)
        answer = services.sync_credentials_issue(agent=agent)
    except DomainError as exc:  # failed authentication or a replay (401), no keys now (503)
        return JsonResponse(exc.body(), status=exc.http_status)
    except redis.RedisError:
        status, answer = UNAVAILABLE
        return JsonResponse(answer, status=status)
    return JsonResponse(answer)


@require_GET
def health(request: HttpRequest) -> JsonResponse:
    """Liveness of the web process: no authentication, no database."""
    return JsonResponse({"status": "ok"})
