"""The heartbeat ingest tier's entry point: `gunicorn dumont.asgi:application -k uvicorn.workers.UvicornWorker`.

Agents' heartbeats are nearly all the traffic. Measured here, gunicorn's gthread worker spends ~0.65 ms of
CPU per request before any of our code runs, uvicorn's worker (httptools, uvloop) ~0.15 ms: so the
heartbeats get their own gunicorn with uvicorn workers, and the API and admin stay on the gthread WSGI
server (`dumont.wsgi`), where a slow request cannot hold up others. Heartbeats go through the same
`agent.api.wsgi.heartbeat_application` as on the WSGI server (same checks, same answers), in a worker
thread since it may query the database; any other request goes to Django's ASGI handler.
"""

import gc
import io
import os

from asgiref.sync import sync_to_async
from django.core.asgi import get_asgi_application
from django.core.exceptions import SynchronousOnlyOperation

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dumont.settings")
django_application = get_asgi_application()

from agent.api.wsgi import heartbeat_application  # noqa: E402 (needs the apps loaded)
from agent.conf import settings  # noqa: E402
from agent.daemon.dumont_agent import STATUS_PATH  # noqa: E402


async def _read_body(receive, limit: int) -> bytes:
    """The request body, or its first `limit + 1` bytes (enough to answer 413)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        if size <= limit:
            chunks.append(chunk)
        size += len(chunk)
        if not message.get("more_body"):
            break
    return b"".join(chunks)


def _environ(scope: dict, body: bytes) -> dict:
    server = scope.get("server") or ("127.0.0.1", 80)
    environ = {
        "REQUEST_METHOD": scope["method"], "PATH_INFO": scope["path"], "SCRIPT_NAME": "",
        "QUERY_STRING": scope.get("query_string", b"").decode("latin-1"), "SERVER_NAME": server[0],
        "SERVER_PORT": str(server[1]), "SERVER_PROTOCOL": f"HTTP/{scope.get('http_version', '1.1')}",
        "wsgi.url_scheme": scope.get("scheme", "http"), "wsgi.input": io.BytesIO(body),
        "CONTENT_LENGTH": str(len(body)),
    }
    for raw_name, raw_value in scope["headers"]:
        name = raw_name.decode("latin-1").upper().replace("-", "_")
        value = raw_value.decode("latin-1")
        key = name if name in ("CONTENT_TYPE", "CONTENT_LENGTH") else f"HTTP_{name}"
        if key == "CONTENT_LENGTH":
            # the declared length, if larger than what was read, makes the 413 check fire
            value = str(max(int(value or 0), len(body))) if value.isdigit() else str(len(body))
        environ[key] = f"{environ[key]},{value}" if key in environ and key.startswith("HTTP_") else value
    return environ


def _answer_heartbeat(environ: dict) -> tuple[str, list, bytes] | None:
    """(status, headers, body), or None when Django must answer (a redirect, a refused host)."""
    answered = {}

    def start_response(status, headers, exc_info=None):
        answered.update(status=status, headers=headers)

    def to_django(environ, start_response):
        return []

    body = b"".join(heartbeat_application(environ, start_response, to_django))
    return (answered["status"], answered["headers"], body) if answered else None


HEALTH_PATH = "/api/v1/health"
HEALTH_BODY = b'{"status": "ok"}'


async def application(scope, receive, send):
    if scope["type"] == "http" and scope["path"] == HEALTH_PATH and scope["method"] == "GET":
        # liveness of this process, as agent.api.views.health answers it: no database, no Django
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(HEALTH_BODY)).encode())]})
        return await send({"type": "http.response.body", "body": HEALTH_BODY})
    if scope["type"] != "http" or scope["path"] != STATUS_PATH or scope["method"] != "POST":
        return await django_application(scope, receive, send)
    body = await _read_body(receive, settings.AGENT_MAX_BODY_BYTES)
    environ = _environ(scope, body)
    try:
        # Redis only, on the event loop: a thread hop per heartbeat would cost more than the work
        answer = _answer_heartbeat(environ)
    except SynchronousOnlyOperation:
        # the credential mirror missed and PostgreSQL must be asked (before anything was stored): in a thread
        environ["wsgi.input"].seek(0)
        answer = await sync_to_async(_answer_heartbeat, thread_sensitive=False)(environ)
    if answer is None:
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await django_application(scope, replay, send)
    status, headers, content = answer
    await send({"type": "http.response.start", "status": int(status.split(" ", 1)[0]),
                "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]})
    await send({"type": "http.response.body", "body": content})


# Django, DRF and the apps are a heap of long-lived objects: move them out of the collector's reach, so
# that a full collection (every few thousand heartbeats) walks only what requests allocate. Measured:
# without it, collections stall the event loop long enough to push the heartbeats' p99 past 50 ms.
gc.freeze()
