"""The HTTP client: JWT access tokens refreshed on their own, the API's errors as one line, and a lost
connection retried with backoff (and said so on stderr)."""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from typing import Any

import requests
import tenacity
from urllib3.exceptions import NewConnectionError

from dumont_cli.config import ConfigDir, Session

TIMEOUT_SECONDS = 30
# an access token this close to its expiry is refreshed before use, not after a 401
EXPIRY_MARGIN_SECONDS = 10


class CliError(Exception):
    """Shown as one line on stderr; the command exits 1."""


class ApiError(CliError):
    def __init__(self, status: int, code: str, message: str, body: Any = None):
        super().__init__(message)
        self.status, self.code, self.body = status, code, body


def error_line(response: requests.Response) -> ApiError:
    """The API's own message (`{"error", "detail", "fields"}`), on one line."""
    try:
        body = response.json()
    except ValueError:
        return ApiError(response.status_code, "http_error", f"HTTP {response.status_code} from {response.url}")
    if not isinstance(body, dict):
        return ApiError(response.status_code, "http_error", f"HTTP {response.status_code}: {body}", body)
    message = str(body.get("detail") or body.get("error") or f"HTTP {response.status_code}")
    fields = body.get("fields") or {}
    if isinstance(fields, dict) and fields:
        parts = [f"{name}: {' '.join(map(str, errors if isinstance(errors, list) else [errors]))}"
                 for name, errors in fields.items()]
        message = f"{message} ({'; '.join(parts)})"
    return ApiError(response.status_code, str(body.get("error") or "error"), " ".join(message.split()), body)


def _claims(token: str) -> dict:
    """A JWT's claims (read, not verified: the server verifies; we only avoid a needless 401)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return claims if isinstance(claims, dict) else {}
    except (IndexError, ValueError):
        return {}


def token_expiry(token: str) -> float:
    return float(_claims(token).get("exp") or 0)


def token_fresh(token: str) -> bool:
    """Valid for a while yet: a refresh comes before the token expires, not after a 401."""
    claims = _claims(token)
    expiry, issued = float(claims.get("exp") or 0), float(claims.get("iat") or 0)
    margin = min(EXPIRY_MARGIN_SECONDS, (expiry - issued) / 4) if issued else EXPIRY_MARGIN_SECONDS
    return expiry > time.time() + margin


def _never_sent(exc: BaseException) -> bool:
    """A request that failed before reaching the server: safe to send again whatever its method."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(exc, requests.ConnectionError) and isinstance(reason, NewConnectionError)


def _retry_says_so(state: tenacity.RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    delay = state.next_action.sleep if state.next_action else 0
    print(f"dumont: connection to the API lost ({type(exc).__name__}); retrying in {delay:.0f}s "
          f"(attempt {state.attempt_number + 1} of {_attempts()})", file=sys.stderr, flush=True)


def _attempts() -> int:
    return int(os.environ.get("DUMONT_RETRIES", "6"))


class Api:
    def __init__(self, config: ConfigDir, *, url: str | None = None, session: Session | None = None):
        self.config = config
        self.session = session if session is not None else config.load_session()
        self.url = (url or (self.session.url if self.session else "")).rstrip("/")
        self.http = requests.Session()
        self.http.headers["User-Agent"] = "dumont-cli"
        self.calls = 0  # requests sent, for the proxy's latency budget

    # ---- transport ----------------------------------------------------------------------------

    def _send(self, method: str, path: str, **kwargs) -> requests.Response:
        idempotent = method in ("GET", "HEAD", "PUT", "DELETE")

        def retryable(exc: BaseException) -> bool:
            lost = isinstance(exc, requests.ConnectionError | requests.Timeout)
            return lost and (idempotent or _never_sent(exc))

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(retryable),
            stop=tenacity.stop_after_attempt(_attempts()),
            wait=tenacity.wait_exponential(multiplier=1, max=float(os.environ.get("DUMONT_RETRY_MAX_SECONDS", "16"))),
            before_sleep=_retry_says_so, reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    self.calls += 1
                    return self.http.request(method, f"{self.url}{path}", timeout=TIMEOUT_SECONDS, **kwargs)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise CliError(f"cannot reach the API at {self.url}: {type(exc).__name__}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    # ---- authentication -----------------------------------------------------------------------

    def login(self, username: str, password: str) -> Session:
        response = self._send("POST", "/api/v1/auth/login", json={"username": username, "password": password})
        if response.status_code != 200:
            raise error_line(response)
        tokens = response.json()
        self.session = Session(url=self.url, username=username, refresh=tokens["refresh"], access=tokens["access"])
        self.config.save_session(self.session)
        return self.session

    def logout(self) -> None:
        if self.session:
            self._access_token()  # a refresh first, if due: it rotates the refresh token we revoke
            self.request("POST", "/api/v1/auth/logout", json={"refresh": self.session.refresh}, expect=(204,))
        self.config.forget_session()

    def _access_token(self, *, force_refresh: bool = False) -> str:
        if not self.session:
            raise CliError("not logged in: run `dumont login --url URL --username NAME`")
        if not force_refresh and token_fresh(self.session.access):
            return self.session.access
        stale = self.session.access
        with self.config.locked():
            # another process (a second proxy, say) may have refreshed meanwhile: its tokens are ours
            current = self.config.load_session()
            if current is None:
                raise CliError("not logged in: run `dumont login --url URL --username NAME`")
            self.session = current
            if current.access != stale and token_fresh(current.access):
                return current.access
            response = self._send("POST", "/api/v1/auth/refresh", json={"refresh": current.refresh})
            if response.status_code in (400, 401):
                raise CliError(f"session expired ({error_line(response)}): run `dumont login` again")
            if response.status_code != 200:
                raise error_line(response)
            tokens = response.json()
            current.access = tokens["access"]
            current.refresh = tokens.get("refresh", current.refresh)
            self.config.save_session(current)
        return current.access

    # ---- requests -----------------------------------------------------------------------------

    def request(self, method: str, path: str, *, expect: tuple[int, ...] = (200, 201, 202), **kwargs) -> Any:
        response = self._send(method, path, headers={"Authorization": f"Bearer {self._access_token()}"}, **kwargs)
        if response.status_code == 401:
            token = self._access_token(force_refresh=True)
            response = self._send(method, path, headers={"Authorization": f"Bearer {token}"}, **kwargs)
        if response.status_code not in expect:
            raise error_line(response)
        return response.json() if response.content else None

    def get(self, path: str, **params) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v not in (None, "")})

    def post(self, path: str, body: dict | None = None, **kwargs) -> Any:
        return self.request("POST", path, json=body or {}, **kwargs)

    def all_pages(self, path: str, **params) -> list[dict]:
        results: list[dict] = []
        number = 1
        while True:
            page = self.get(path, page=number, page_size=500, **params)
            results.extend(page["results"])
            if not page.get("next"):
                return results
            number += 1

    # ---- instances by name --------------------------------------------------------------------

    def instance(self, name: str) -> dict:
        """The instance called `name`: the live one, else the latest destroyed one (names are reused)."""
        found = self.get("/api/v1/instances", name=name)["results"]
        if not found and name.isdigit():
            return self.get(f"/api/v1/instances/{name}")
        if not found:
            raise CliError(f"no instance named {name!r}")
        live = [i for i in found if i["status"] not in ("destroyed", "failed")]
        return (live or found)[0]
