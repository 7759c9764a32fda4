"""Rate limits (DRF throttles) counted in Redis, so every web process and server counts together (a
process's local memory would let N processes allow N times the limit). A refused request is a 429
with `Retry-After`. Rates are settings (THROTTLE_*, "<n>/<s|m|h|d>"; empty: no limit). The agents'
heartbeats are limited per instance in agent.buffer's ingest, on their own hot path."""

from __future__ import annotations

import functools

from django.conf import settings
from django.core.cache.backends.redis import RedisCache
from rest_framework.throttling import SimpleRateThrottle


@functools.cache
def _counters(url: str, prefix: str) -> RedisCache:
    return RedisCache(url, {"KEY_PREFIX": f"{prefix}:throttle"})


class _RedisRateThrottle(SimpleRateThrottle):
    setting = ""

    def __init__(self):
        # REDIS_URL and REDIS_KEY_PREFIX read now, not at import: the test suite moves each xdist worker
        # to its own database and prefix after settings load
        self.cache = _counters(settings.REDIS_URL, settings.REDIS_KEY_PREFIX)
        super().__init__()

    def get_rate(self) -> str | None:
        return getattr(settings, self.setting) or None  # read each time: a test may change it

    def allow_request(self, request, view) -> bool:
        if self.rate is None:
            return True
        return super().allow_request(request, view)


class LoginPerUsernameThrottle(_RedisRateThrottle):
    """Password guesses against one account, from anywhere."""

    scope = "login-username"
    setting = "THROTTLE_LOGIN_PER_USERNAME"

    def get_cache_key(self, request, view) -> str | None:
        data = request.data if isinstance(request.data, dict) else {}
        name = data.get("username") or data.get("email")
        if not isinstance(name, str) or not name:
            return None
        return self.cache_format % {"scope": self.scope, "ident": name.strip().lower()[:150]}


class LoginPerAddressThrottle(_RedisRateThrottle):
    """Password guesses from one client address, against any account."""

    scope = "login-address"
    setting = "THROTTLE_LOGIN_PER_ADDRESS"

    def get_cache_key(self, request, view) -> str:
        return self.cache_format % {"scope": self.scope, "ident": self.get_ident(request)}


class ApiPerUserThrottle(_RedisRateThrottle):
    """Every authenticated API request, per user (anonymous requests: per client address)."""

    scope = "api-user"
    setting = "THROTTLE_API_PER_USER"

    def get_cache_key(self, request, view) -> str:
        user = getattr(request, "user", None)
        ident = user.pk if user is not None and user.is_authenticated else self.get_ident(request)
        return self.cache_format % {"scope": self.scope, "ident": ident}
