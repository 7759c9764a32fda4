"""vast.ai adapter: the REST subset described in /work/shared/PROVIDERS.md.

The same code talks to the local marketplace (`machines.providers.local`), which speaks this
subset on a loopback port, so every path here is exercised offline.
"""

from __future__ import annotations

import logging
import shlex
from decimal import Decimal
from typing import Any

import requests
import tenacity

from machines.providers.base import (
    STATUS_CREATING,
    STATUS_FAILED,
    STATUS_GONE,
    STATUS_RUNNING,
    STATUS_STOPPED,
    AuthError,
    CapacityError,
    FatalError,
    LaunchRequest,
    NotFoundError,
    Offer,
    OfferQuery,
    Provider,
    ProviderError,
    ProviderInstance,
    RetryableError,
    register_provider,
)

log = logging.getLogger(__name__)

ONSTART_LIMIT_BYTES = 4096  # vast.ai truncates/refuses larger onstart scripts
RETRYABLE_STATUS = {429, 500, 502, 503, 504}
CAPACITY_ERRORS = {"no_such_ask"}  # the offer was rented by someone else / is gone

_STATUS_MAP: dict[str | None, str] = {
    None: STATUS_CREATING,
    "created": STATUS_CREATING,
    "loading": STATUS_CREATING,
    "rebooting": STATUS_CREATING,
    "scheduling": STATUS_CREATING,
    "running": STATUS_RUNNING,
    "stopped": STATUS_STOPPED,
    "frozen": STATUS_STOPPED,
    "exited": STATUS_FAILED,
    "unknown": STATUS_FAILED,
    "offline": STATUS_FAILED,
}


def normalise_status(actual_status: str | None) -> str:
    # A word we do not know yet is treated as "still coming up": the caller's timeout decides.
    return _STATUS_MAP.get(actual_status, STATUS_CREATING)


class _BearerAuth(requests.auth.AuthBase):
    """Adds the key per request, so it lives in one attribute that never prints."""

    def __init__(self, api_key: str):
        self._api_key = api_key

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._api_key}"
        return request

    def __repr__(self) -> str:
        return "<BearerAuth ***>"

    def redact(self, text: str) -> str:
        return text.replace(self._api_key, "***")


class _MaybeApplied(RetryableError):
    """A retryable failure after which the request may or may not have been applied upstream
    (timeout, dropped connection, 5xx). Private: it leaves this module as a plain RetryableError."""


@register_provider("vastai")
class VastAIProvider(Provider):
    def __init__(
        self,
        api_key: str,
        base_url: str = "https://console.vast.ai/api/v0/",
        timeout: float = 20,
        max_attempts: int = 5,
        *,
        backoff_initial: float = 0.3,
        backoff_max: float = 10.0,
    ):
        if not api_key:
            raise AuthError("vast.ai API key is empty", provider=self.name)
        self._base_url = base_url.rstrip("/") + "/"
        self._timeout = timeout
        self._max_attempts = max(1, max_attempts)
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._session = requests.Session()
        self._auth = _BearerAuth(api_key)  # the only place the key is kept; its repr is masked
        self._session.auth = self._auth

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self._base_url!r})"

    # ---- offers ---------------------------------------------------------------------------

    def search_offers(self, query: OfferQuery) -> list[Offer]:
        data = self._call("POST", "bundles/", json=self.offer_filter(query))
        return [self._offer(raw) for raw in data.get("offers") or []]

    @staticmethod
    def offer_filter(query: OfferQuery) -> dict[str, Any]:
        body: dict[str, Any] = {
            "verified": {"eq": True},
            "rentable": {"eq": True},
            "rented": {"eq": False},
        }
        if query.gpu_name:
            body["gpu_name"] = {"eq": query.gpu_name}
        if query.num_gpus is not None:
            body["num_gpus"] = {"eq": query.num_gpus}
        if query.max_price_per_hour is not None:
            body["dph_total"] = {"lte": float(query.max_price_per_hour)}
        if query.region:
            body["geolocation"] = {"in": [query.region]}
        if query.min_disk_gb is not None:
            body["disk_space"] = {"gte": query.min_disk_gb}
        if query.min_reliability is not None:
            body["reliability"] = {"gte": query.min_reliability}
        if query.exclude_host_ids:
            body["machine_id"] = {"notin": [_int_or_str(h) for h in query.exclude_host_ids]}
        body["order"] = [["dph_total", "asc"]]
        body["type"] = "bid" if query.interruptible else "on-demand"
        body["limit"] = query.limit
        return body

    def _offer(self, raw: dict[str, Any]) -> Offer:
        return Offer(
            provider=self.name,
            offer_id=str(raw["id"]),
            host_id=str(raw.get("machine_id")),
            gpu_name=raw.get("gpu_name") or "",
            num_gpus=int(raw.get("num_gpus") or 0),
            gpu_ram_gb=round(float(raw.get("gpu_ram") or 0) / 1024, 1),  # MB on the wire
            price_per_hour=_decimal(raw.get("dph_total")) or Decimal(0),
            reliability=_float(raw.get("reliability", raw.get("reliability2"))),
            region=raw.get("geolocation") or "",
            disk_gb=float(raw.get("disk_space") or 0),
            inet_down_mbps=_float(raw.get("inet_down")),
            raw=raw,
        )

    # ---- create ---------------------------------------------------------------------------

    def create(self, offer: Offer, launch: LaunchRequest) -> ProviderInstance:
        body = {
            "client_id": "me",
            "image": launch.image,
            "disk": launch.disk_gb,
            "label": launch.label,
            "onstart": build_onstart(launch),
            "runtype": "ssh_direc ssh_proxy",
            "env": dict(launch.env),
            "price": self._bid_price(offer) if launch.interruptible else None,
            "cancel_unavail": True,
        }
        path = f"asks/{offer.offer_id}/"
        # Exactly once per label: after an answer we never got, the machine may exist. Look for
        # it by label before sending the create again, and once more when retries run out.
        maybe_created = False
        try:
            for attempt in self._retrying():
                with attempt:
                    if maybe_created:
                        found = self._find_by_label(launch.label, retry=False)
                        if found is not None:
                            return found
                    try:
                        data = self._request("PUT", path, json=body, capacity_path=True)
                    except _MaybeApplied:
                        maybe_created = True
                        raise
        except RetryableError as exc:
            if maybe_created:
                found = self._find_by_label(launch.label, retry=True)
                if found is not None:
                    return found
            raise RetryableError(str(exc), status_code=exc.status_code, provider=self.name) from None
        return self._created(data, offer, launch)

    def _created(self, data: dict[str, Any], offer: Offer, launch: LaunchRequest) -> ProviderInstance:
        contract = data.get("new_contract")
        if data.get("error"):  # an error next to success: true still means the create failed
            if contract:
                self._destroy_quietly(str(contract))
            raise _error_from_body(data, status_code=200, provider=self.name, capacity_path=True)
        if not contract:
            raise FatalError(f"create answered without new_contract: {data!r}", provider=self.name)
        return ProviderInstance(
            provider=self.name,
            instance_id=str(contract),
            status=STATUS_CREATING,
            raw_status=None,
            label=launch.label,
            host_id=offer.host_id,
            price_per_hour=Decimal(str(self._bid_price(offer)))
            if launch.interruptible
            else offer.price_per_hour,
            raw=data,
        )

    @staticmethod
    def _bid_price(offer: Offer) -> float:
        min_bid = offer.raw.get("min_bid")
        return float(min_bid if min_bid is not None else offer.price_per_hour)

    def _find_by_label(self, label: str, *, retry: bool) -> ProviderInstance | None:
        matches = [i for i in self._list(retry=retry) if i.label == label and i.status != STATUS_GONE]
        if not matches:
            return None
        matches.sort(key=lambda i: (len(i.instance_id), i.instance_id))  # numeric order for digit ids
        for extra in matches[1:]:
            # Two machines under one label can only come from our own resent create.
            log.warning("vast.ai: duplicate machine %s for label %s, destroying it", extra.instance_id, label)
            self._destroy_quietly(extra.instance_id)
        return matches[0]

    # ---- read -----------------------------------------------------------------------------

    def get(self, instance_id: str) -> ProviderInstance:
        try:
            data = self._call("GET", f"instances/{instance_id}/", params={"owner": "me"})
        except NotFoundError:
            return self._gone(instance_id)
        raw = data.get("instances")
        if isinstance(raw, list):  # some API versions answer a one-element list
            raw = raw[0] if raw else None
        if not raw:
            return self._gone(instance_id)
        return self._instance(raw)

    def list(self, label_prefix: str = "") -> list[ProviderInstance]:
        return [i for i in self._list(retry=True) if (i.label or "").startswith(label_prefix)]

    def _list(self, *, retry: bool) -> list[ProviderInstance]:
        params = {"owner": "me"}
        data = (
            self._call("GET", "instances/", params=params)
            if retry
            else self._request("GET", "instances/", params=params)
        )
        return [self._instance(raw) for raw in data.get("instances") or []]

    def _gone(self, instance_id: str) -> ProviderInstance:
        return ProviderInstance(
            provider=self.name,
            instance_id=str(instance_id),
            status=STATUS_GONE,
            raw_status="no_such_instance",
        )

    def _instance(self, raw: dict[str, Any]) -> ProviderInstance:
        actual = raw.get("actual_status")
        host, port = ssh_target(raw)
        gpu_util = _float(raw.get("gpu_util"))
        return ProviderInstance(
            provider=self.name,
            instance_id=str(raw["id"]),
            status=normalise_status(actual),
            raw_status=actual,
            label=raw.get("label"),
            host_id=str(raw["machine_id"]) if raw.get("machine_id") is not None else None,
            ssh_host=host,
            ssh_port=port,
            ssh_user=raw.get("ssh_user") or "root",  # extension field of the local marketplace
            ssh_host_key=raw.get("ssh_host_key"),  # idem; absent on the real vast.ai
            price_per_hour=_decimal(raw.get("dph_total")),
            gpu_util=gpu_util,
            started_at=_float(raw.get("start_date")),
            status_message=raw.get("status_msg"),
            platform_fault=bool(raw.get("platform_fault")),  # extension field of the local marketplace
            raw=raw,
        )

    # ---- lifecycle ------------------------------------------------------------------------

    def stop(self, instance_id: str) -> None:
        self._call("PUT", f"instances/{instance_id}/", json={"state": "stopped"})

    def start(self, instance_id: str) -> None:
        self._call("PUT", f"instances/{instance_id}/", json={"state": "running"})

    def destroy(self, instance_id: str) -> None:
        try:
            self._call("DELETE", f"instances/{instance_id}/")
        except NotFoundError:
            return  # already gone: that is what we wanted

    def _destroy_quietly(self, instance_id: str) -> None:
        try:
            self.destroy(instance_id)
        except ProviderError:
            log.exception("vast.ai: could not destroy leftover machine %s", instance_id)

    # ---- transport ------------------------------------------------------------------------

    def _retrying(self) -> tenacity.Retrying:
        return tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(RetryableError),
            stop=tenacity.stop_after_attempt(self._max_attempts),
            # Exponential with jitter: parallel workers hitting vast's per-caller gap spread out.
            wait=tenacity.wait_exponential(multiplier=self._backoff_initial, max=self._backoff_max)
            + tenacity.wait_random(0, self._backoff_initial),
            before_sleep=lambda state: log.info(
                "vast.ai: retrying after %s (attempt %d)", state.outcome.exception(), state.attempt_number
            ),
            reraise=True,
        )

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """One API call, retried on RetryableError with backoff; the last error is raised."""
        try:
            for attempt in self._retrying():
                with attempt:
                    return self._request(method, path, **kwargs)
        except _MaybeApplied as exc:
            raise RetryableError(str(exc), status_code=exc.status_code, provider=self.name) from None
        raise AssertionError("unreachable")  # tenacity re-raises on the last attempt

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json: Any = None,
        capacity_path: bool = False,
    ) -> dict[str, Any]:
        url = self._base_url + path
        failure: str | None = None
        try:
            response = self._session.request(method, url, params=params, json=json, timeout=self._timeout)
        except requests.RequestException as exc:
            # Built outside the except block: the requests exception (which holds the prepared
            # request and its Authorization header) must not ride along as __context__.
            failure = f"{method} {path}: {type(exc).__name__}: {exc}"
        if failure is not None:
            raise _MaybeApplied(self._redact(failure), provider=self.name)
        log.debug("vast.ai %s %s -> %s", method, path, response.status_code)
        return self._decode(method, path, response, capacity_path)

    def _decode(
        self, method: str, path: str, response: requests.Response, capacity_path: bool
    ) -> dict[str, Any]:
        status = response.status_code
        try:
            data = response.json()
        except ValueError:
            data = None
        text = self._redact(response.text[:300].strip())
        where = f"{method} {path}"
        if status in RETRYABLE_STATUS:
            # 429 was refused before doing anything; a 5xx may have been applied upstream.
            cls = RetryableError if status == 429 else _MaybeApplied
            raise cls(f"{where}: HTTP {status}: {text}", status_code=status, provider=self.name)
        if status in (401, 403):
            raise AuthError(f"{where}: HTTP {status}: {text}", status_code=status, provider=self.name)
        if status >= 400 or (isinstance(data, dict) and data.get("success") is False):
            if isinstance(data, dict):
                data = {k: (self._redact(v) if isinstance(v, str) else v) for k, v in data.items()}
                if data.get("new_contract"):
                    # A failed (interruptible) create can leave a stopped machine behind: never leak it.
                    self._destroy_quietly(str(data["new_contract"]))
                raise _error_from_body(
                    data, status_code=status, provider=self.name, capacity_path=capacity_path
                )
            if capacity_path and status in (404, 410):
                raise CapacityError(f"{where}: HTTP {status}: {text}", status_code=status, provider=self.name)
            if status == 404:
                raise NotFoundError(f"{where}: HTTP 404: {text}", status_code=status, provider=self.name)
            raise FatalError(f"{where}: HTTP {status}: {text}", status_code=status, provider=self.name)
        if not isinstance(data, dict):
            raise FatalError(
                f"{where}: HTTP {status}: not a JSON object: {text}", status_code=status, provider=self.name
            )
        return data

    def _redact(self, text: str) -> str:
        return self._auth.redact(text)


def _error_from_body(
    data: dict[str, Any], *, status_code: int, provider: str, capacity_path: bool
) -> ProviderError:
    code = str(data.get("error") or "")
    msg = str(data.get("msg") or data.get("message") or code or data)
    text = f"{code}: {msg}" if code and code not in msg else msg
    lowered = msg.lower()
    if code == "no_such_instance":
        return NotFoundError(text, status_code=status_code, provider=provider)
    if code in CAPACITY_ERRORS or (
        # "Instance type by id N is not available.": vast's words for an offer taken meanwhile.
        capacity_path and (status_code in (404, 410) or "not available" in lowered)
    ):
        return CapacityError(text, status_code=status_code, provider=provider)
    if status_code in (401, 403) or code in ("unauthorized", "invalid_api_key", "forbidden"):
        return AuthError(text, status_code=status_code, provider=provider)
    if status_code == 404:
        return NotFoundError(text, status_code=status_code, provider=provider)
    return FatalError(text, status_code=status_code, provider=provider)


def build_onstart(launch: LaunchRequest) -> str:
    """The boot script: install every key (idempotently: vast reruns onstart on each start), then the
    launch's own onstart. Raises FatalError past vast's ~4 KB limit."""
    lines = [
        "#!/bin/sh",
        "# dumont: ssh keys first, so the control plane can reach the machine",
        'umask 077; mkdir -p "$HOME/.ssh"; touch "$HOME/.ssh/authorized_keys"',
    ]
    for key in launch.ssh_public_keys:
        key = key.strip()
        if not key or "\n" in key or "\r" in key:
            raise FatalError("an SSH public key must be one non-empty line", provider="vastai")
        quoted = shlex.quote(key)
        lines.append(
            f'grep -qxF {quoted} "$HOME/.ssh/authorized_keys" || echo {quoted} >> "$HOME/.ssh/authorized_keys"'
        )
    if launch.onstart.strip():
        lines += ["umask 022", launch.onstart.rstrip("\n")]
    script = "\n".join(lines) + "\n"
    size = len(script.encode())
    if size > ONSTART_LIMIT_BYTES:
        raise FatalError(
            f"onstart script is {size} bytes, over vast.ai's {ONSTART_LIMIT_BYTES}", provider="vastai"
        )
    return script


def ssh_target(raw: dict[str, Any]) -> tuple[str | None, int | None]:
    """`public_ipaddr` + the mapped 22/tcp port when the machine is direct, else the ssh proxy."""
    mapped = (raw.get("ports") or {}).get("22/tcp") or []
    if raw.get("public_ipaddr") and mapped and mapped[0].get("HostPort"):
        return str(raw["public_ipaddr"]).strip(), int(mapped[0]["HostPort"])
    if raw.get("ssh_host") and raw.get("ssh_port"):
        return str(raw["ssh_host"]), int(raw["ssh_port"])
    return None, None


def _float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _decimal(value: Any) -> Decimal | None:
    return None if value is None else Decimal(str(value))


def _int_or_str(value: str) -> int | str:
    return int(value) if str(value).isdigit() else value
