"""`POST /api/v1/agent/status` as a bare WSGI callable: the agents' heartbeats are nearly all the
traffic, and Django's request, middleware and URL resolving cost as much as the heartbeat's own work.

dumont.wsgi sends the heartbeats here; this answers exactly what the Django view
(agent.api.views.agent_status) answers, with the same `status_answer`, the same security headers, the
same `django.request` log lines for 4xx/5xx answers and errors. Whatever it would need more of Django
for (a host that ALLOWED_HOSTS refuses, a plain-HTTP request to redirect to HTTPS) goes to Django.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any

from django.core.exceptions import SynchronousOnlyOperation
from django.http.request import split_domain_port, validate_host

from agent.api.views import status_answer
from agent.conf import settings

WSGIApp = Callable[[dict[str, Any], Callable], Iterable[bytes]]

request_log = logging.getLogger("django.request")
SERVER_ERROR = (500, {"error": "server_error", "detail": "Internal server error."})  # dumont.core.errors


def _secure(environ: dict[str, Any]) -> bool:
    if settings.SECURE_PROXY_SSL_HEADER:
        header, value = settings.SECURE_PROXY_SSL_HEADER
        forwarded = environ.get(header)
        if forwarded is not None:
            return forwarded.split(",", 1)[0].strip() == value
    return environ.get("wsgi.url_scheme") == "https"


def _django_would_answer_otherwise(environ: dict[str, Any], secure: bool) -> bool:
    """A redirect to HTTPS (SecurityMiddleware) or a refused host (CommonMiddleware): Django's job."""
    if settings.SECURE_SSL_REDIRECT and not secure:
        return True
    if settings.USE_X_FORWARDED_HOST and "HTTP_X_FORWARDED_HOST" in environ:
        host = environ["HTTP_X_FORWARDED_HOST"]
    else:
        host = environ.get("HTTP_HOST")
    if host is None:
        return True  # Django rebuilds it from SERVER_NAME: rare enough to leave to Django
    allowed = settings.ALLOWED_HOSTS or ([".localhost", "127.0.0.1", "[::1]"] if settings.DEBUG else [])
    domain, _ = split_domain_port(host)
    return not (domain and validate_host(domain, allowed))


def _headers(body: bytes, secure: bool) -> list[tuple[str, str]]:
    """Django's for a JsonResponse through this project's middleware."""
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    if settings.SECURE_HSTS_SECONDS and secure:
        hsts = f"max-age={settings.SECURE_HSTS_SECONDS}"
        hsts += "; includeSubDomains" if settings.SECURE_HSTS_INCLUDE_SUBDOMAINS else ""
        hsts += "; preload" if settings.SECURE_HSTS_PRELOAD else ""
        headers.append(("Strict-Transport-Security", hsts))
    if settings.SECURE_CONTENT_TYPE_NOSNIFF:
        headers.append(("X-Content-Type-Options", "nosniff"))
    if settings.SECURE_REFERRER_POLICY:
        policy = settings.SECURE_REFERRER_POLICY
        headers.append(("Referrer-Policy", policy if isinstance(policy, str) else ",".join(policy)))
    if settings.SECURE_CROSS_ORIGIN_OPENER_POLICY:
        headers.append(("Cross-Origin-Opener-Policy", settings.SECURE_CROSS_ORIGIN_OPENER_POLICY))
    headers.append(("X-Frame-Options", getattr(settings, "X_FRAME_OPTIONS", "DENY").upper()))
    return headers


def heartbeat_application(environ: dict[str, Any], start_response: Callable, django: WSGIApp) -> Iterable[bytes]:
    """A POST to the heartbeat URL; `django` answers what this does not."""
    secure = _secure(environ)
    if _django_would_answer_otherwise(environ, secure):
        return django(environ, start_response)
    path = environ.get("PATH_INFO", "")
    try:
        def read_body() -> bytes:
            length = int(environ.get("CONTENT_LENGTH") or 0)
            return environ["wsgi.input"].read(length) if length > 0 else b""

        status, answer = status_answer(environ, read_body)
    except SynchronousOnlyOperation:
        raise  # dumont.asgi ran this on its event loop and retries it in a thread
    except Exception:
        request_log.error("Internal Server Error: %s", path, exc_info=True, extra={"status_code": 500, "request": None})
        status, answer = SERVER_ERROR
    else:
        if status >= 400:  # as django.utils.log.log_response
            (request_log.error if status >= 500 else request_log.warning)(
                "%s: %s", HTTPStatus(status).phrase, path, extra={"status_code": status, "request": None}
            )
    body = json.dumps(answer).encode()
    headers = _headers(body, secure)
    if status == 429:
        headers.append(("Retry-After", str(answer["retry_after"])))
    start_response(f"{status} {HTTPStatus(status).phrase}", headers)
    return [body]
