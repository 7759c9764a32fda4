"""The agents' endpoint and the public health check: plain Django views, no DRF and no JWT.

Agents are not users: they authenticate each heartbeat with their instance's HMAC secret
(agent.auth), and the hot path avoids DRF's request/serializer machinery, which would cost more than
the rest of the work together.
"""

from __future__ import annotations

import time

import redis
from django.conf import settings
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from agent import services
from agent.api.payload import heartbeat_parse
from agent.auth import AuthFailed, authenticate
from dumont.core.errors import InvalidInput


def _unauthorized() -> JsonResponse:
    # One answer for every failure: which check failed would help an attacker.
    return JsonResponse({"error": "not_authenticated", "detail": "Authentication failed."}, status=401)


@csrf_exempt  # no cookies are involved: every request carries its own signature
@require_POST
def agent_status(request: HttpRequest) -> JsonResponse:
    """A DumontAgent heartbeat: `{"action": "none" | "prepare_hibernate" | "shutdown", "interval": s}`."""
    received_at = time.time()
    if int(request.META.get("CONTENT_LENGTH") or 0) > settings.AGENT_MAX_BODY_BYTES:
        return JsonResponse({"error": "too_large", "detail": "The heartbeat is too large."}, status=413)
    body = request.body  # the exact bytes that were signed
    try:
        agent = authenticate(request.META, body)
    except AuthFailed:
        return _unauthorized()
    try:
        heartbeat = heartbeat_parse(body)
    except InvalidInput as exc:
        return JsonResponse({"error": exc.code, "detail": exc.detail, **exc.data}, status=400)
    try:
        answer = services.heartbeat_record(agent=agent, heartbeat=heartbeat, received_at=received_at)
    except services.Replay:
        return _unauthorized()
    except redis.RedisError:
        # not accepted: the agent retries with backoff rather than lose the heartbeat silently
        return JsonResponse({"error": "unavailable", "detail": "Try again later."}, status=503)
    return JsonResponse(answer)


@require_GET
def health(request: HttpRequest) -> JsonResponse:
    """Liveness of the web process: no authentication, no database."""
    return JsonResponse({"status": "ok"})
