"""Heartbeat authentication: per-instance HMAC secrets, a time window, and one-time nonces.

The signature scheme itself lives in the daemon (`agent.daemon.dumont_agent.signature`), so agent
and server can never disagree on it. Every failure is the same `AuthFailed`: the client learns
nothing that would help it guess (which instance exists, which check failed).
"""

from __future__ import annotations

import hmac
import re
import threading
import time
from dataclasses import dataclass

from agent import mirror
from agent.conf import settings
from agent.daemon.dumont_agent import signature
from dumont.core.errors import NotAuthenticated
from dumont.core.fields import decrypt

HEADER_INSTANCE = "HTTP_X_DUMONT_INSTANCE"
HEADER_TIMESTAMP = "HTTP_X_DUMONT_TIMESTAMP"
HEADER_NONCE = "HTTP_X_DUMONT_NONCE"
HEADER_SIGNATURE = "HTTP_X_DUMONT_SIGNATURE"

_NONCE = re.compile(r"[0-9a-f]{16,64}\Z")
_SIGNATURE = re.compile(r"[0-9a-f]{64}\Z")
_DIGITS = re.compile(r"[0-9]{1,18}\Z")


class AuthFailed(NotAuthenticated):
    pass


@dataclass(frozen=True)
class Agent:
    instance_id: int
    instance_status: str
    nonce: str


# ciphertext -> (plain secret, expiry): decrypting costs more than the rest of the check, and a
# rotated or removed credential has a new (or no) ciphertext, so it takes effect at once.
_secrets: dict[str, tuple[str, float]] = {}
_secrets_lock = threading.Lock()


def _plain_secret(ciphertext: str) -> str:
    now = time.monotonic()
    cached = _secrets.get(ciphertext)
    if cached is not None and cached[1] > now:
        return cached[0]
    secret = decrypt(ciphertext)
    with _secrets_lock:
        if len(_secrets) > 100_000:  # a bound, not an LRU: entries are cheap to rebuild
            _secrets.clear()
        _secrets[ciphertext] = (secret, now + settings.AGENT_SECRET_CACHE_SECONDS)
    return secret


def authenticate(meta: dict, body: bytes, *, path: str) -> Agent:
    """Check a signed agent request's headers and signature, made for this method and this endpoint's
    `path` (a signature made for another endpoint fails). Raises AuthFailed; never records anything; raises
    redis.RedisError when Redis is unavailable (the instance's credential and status come from Redis,
    agent.mirror, fresh: the answered action follows the instance's status at once).

    The nonce is only checked for reuse when the heartbeat is stored (atomically, in agent.buffer).
    """
    instance = meta.get(HEADER_INSTANCE, "")
    timestamp = meta.get(HEADER_TIMESTAMP, "")
    nonce = meta.get(HEADER_NONCE, "")
    given = meta.get(HEADER_SIGNATURE, "")
    if not (_DIGITS.match(instance) and _DIGITS.match(timestamp) and _NONCE.match(nonce) and _SIGNATURE.match(given)):
        raise AuthFailed
    age = time.time() - int(timestamp)
    if not -settings.AGENT_CLOCK_SKEW_SECONDS <= age <= settings.AGENT_SIGNATURE_MAX_AGE_SECONDS:
        raise AuthFailed
    instance_id = int(instance)
    found = mirror.credential(instance_id)
    if found is None:
        raise AuthFailed
    ciphertext, status = found
    expected = signature(_plain_secret(ciphertext), instance_id, timestamp, nonce, body, path=path,
                         method=meta.get("REQUEST_METHOD", ""))
    if not hmac.compare_digest(expected, given):
        raise AuthFailed
    return Agent(instance_id=instance_id, instance_status=status, nonce=nonce)
