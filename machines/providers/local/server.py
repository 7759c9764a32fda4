"""HTTP face of the local marketplace: the vast.ai REST subset under /api/v0/, control under /_market/.

One process (stdlib ThreadingHTTPServer); the world lives in market.Marketplace.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from machines.providers.local.market import ApiError, Marketplace

log = logging.getLogger(__name__)

API_PREFIX = "/api/v0/"
TOO_FREQUENT = b"API requests too frequent"  # vast's exact 429 body: plain text, no Retry-After
SERVER_FILE = "server.json"  # written into the state dir once listening: {"url", "pid", "port"}

Reply = tuple[int, Any]


class MarketServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], market: Marketplace):
        super().__init__(address, MarketHandler)
        self.market = market

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            # A client that gave up (timeout, "slow" fault) hung up before our answer: expected.
            log.debug("connection from %s ended early", client_address)
        else:
            log.exception("request from %s failed", client_address)


class MarketHandler(BaseHTTPRequestHandler):
    server: MarketServer
    protocol_version = "HTTP/1.1"  # keep-alive, as requests' session expects

    def do_GET(self) -> None:  # noqa: N802 (stdlib naming)
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._handle("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle("DELETE")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        log.debug("%s %s", self.address_string(), format % args)

    # ---- dispatch ---------------------------------------------------------------------------

    def _handle(self, method: str) -> None:
        path = urlsplit(self.path).path
        if not path.endswith("/"):
            path += "/"
        try:
            body = self._body()
        except ValueError:
            self._send(400, {"success": False, "error": "invalid_args", "msg": "body is not JSON"})
            return
        market = self.server.market
        if path.startswith("/_market/"):
            self._send(*self._guarded(lambda: _control(market, method, path[len("/_market/") :], body)))
            return
        if not path.startswith(API_PREFIX):
            self._send(404, {"success": False, "error": "not_found", "msg": f"no route {path}"})
            return
        route = path[len(API_PREFIX) :]
        if (
            not self.headers.get("Authorization", "").startswith("Bearer ")
            or len(self.headers["Authorization"]) < 8
        ):
            self._send(401, {"success": False, "error": "auth_error", "msg": "missing or malformed API key"})
            return
        fault = market.pick_fault(f"{method} /{route.split('/')[0]}/")
        if fault in (429, 500, 502, 503, 504):
            if fault == 429:
                self._send_text(429, TOO_FREQUENT)
            else:
                self._send(int(fault), {"success": False, "error": "server_error", "msg": "injected fault"})
            return
        status, reply = self._guarded(lambda: _api(market, method, route, body))
        # "slow" and "drop" hit after the work is done: the caller cannot tell whether it happened.
        if fault == "slow":
            time.sleep(float(market.faults["slow_seconds"]))
        if fault == "drop":
            self.close_connection = True
            return
        self._send(status, reply)

    @staticmethod
    def _guarded(call: Any) -> Reply:
        try:
            return call()
        except ApiError as exc:
            return exc.status, exc.body()
        except Exception as exc:
            log.exception("marketplace request failed")
            return 500, {"success": False, "error": "server_error", "msg": str(exc)}

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        return json.loads(raw) if raw.strip() else {}

    def _send(self, status: int, data: Any) -> None:
        self._send_bytes(status, json.dumps(data).encode(), "application/json")

    def _send_text(self, status: int, text: bytes) -> None:
        self._send_bytes(status, text, "text/plain; charset=utf-8")

    def _send_bytes(self, status: int, payload: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


_INSTANCE = re.compile(r"instances/(\d+)/\Z")
_ASK = re.compile(r"asks/(\d+)/\Z")


def _api(market: Marketplace, method: str, route: str, body: Any) -> Reply:
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_args", "body must be a JSON object")
    if method == "POST" and route == "bundles/":
        return 200, {"offers": market.search(body)}
    if method == "PUT" and (m := _ASK.match(route)):
        return 200, {"success": True, "new_contract": market.create(int(m[1]), body)}
    if method == "GET" and route == "instances/":
        return 200, {"instances": market.instances()}
    if m := _INSTANCE.match(route):
        rental_id = int(m[1])
        if method == "GET":
            return 200, {"instances": market.instance(rental_id)}
        if method == "PUT":
            market.set_state(rental_id, str(body.get("state")))
            return 200, {"success": True}
        if method == "DELETE":
            market.destroy(rental_id)
            return 200, {"success": True}
    raise ApiError(404, "not_found", f"no route {method} {API_PREFIX}{route}")


_CONTROL_INSTANCE = re.compile(r"instances/(\d+)/(gpu_util|crash|partition|host_stop)/\Z")
_CONTROL_HOST = re.compile(r"hosts/([^/]+)/\Z")


def _control(market: Marketplace, method: str, route: str, body: Any) -> Reply:
    if method == "GET":
        if route == "health/":
            return 200, {"ok": True, "pid": os.getpid()}
        if route == "state/":
            return 200, market.state()
        if route == "hosts/":
            return 200, {"hosts": market.hosts()}
    if method == "POST":
        if not isinstance(body, dict):
            raise ApiError(400, "invalid_args", "body must be a JSON object")
        if m := _CONTROL_HOST.match(route):
            return 200, market.set_host(m[1], body)
        if route == "faults/":
            return 200, market.set_faults(body)
        if route == "time_scale/":
            market.set_time_scale(float(body.get("time_scale", 0)))
            return 200, {"time_scale": market.time_scale}
        if route == "destroy_all/":
            return 200, {"destroyed": market.destroy_all()}
        if route == "partition_all/":
            return 200, {"partitioned": market.partition_all(bool(body.get("on", True)))}
        if m := _CONTROL_INSTANCE.match(route):
            rental_id = int(m[1])
            if m[2] == "crash":
                market.crash(rental_id)
                return 200, {"success": True}
            if m[2] == "partition":
                market.partition(rental_id, bool(body.get("on", True)))
                return 200, {"success": True}
            if m[2] == "host_stop":
                market.host_stop(rental_id)
                return 200, {"success": True}
            market.set_gpu_util(rental_id, float(body.get("gpu_util", -1)))
            return 200, {"success": True}
    raise ApiError(404, "not_found", f"no control route {method} /_market/{route}")


def serve(
    *,
    host: str,
    port: int,
    state_dir: Path,
    catalogue: Path | None = None,
    time_scale: float | None = None,
    seed: int | None = None,
) -> None:
    """Run until SIGTERM/SIGINT; then every machine's sshd is stopped (statuses stay for a restart)."""
    market = Marketplace(state_dir, catalogue=catalogue, time_scale=time_scale, seed=seed)
    server = MarketServer((host, port), market)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if not stopping.is_set():
            stopping.set()
            # shutdown() blocks until serve_forever returns, so never from serve_forever's own thread.
            threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        market.start()
        actual_port = server.server_address[1]
        url = f"http://{host}:{actual_port}"
        info = {"url": url, "api_url": url + API_PREFIX, "pid": os.getpid(), "port": actual_port}
        tmp = market.state_dir / (SERVER_FILE + ".tmp")
        tmp.write_text(json.dumps(info))
        tmp.replace(market.state_dir / SERVER_FILE)
        print(f"local marketplace listening on {url}{API_PREFIX} (state {market.state_dir})", flush=True)
        server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()
        market.shutdown()
        (market.state_dir / SERVER_FILE).unlink(missing_ok=True)
        print("local marketplace stopped", flush=True)
