"""PostgreSQL advisory locks: "only one of these at a time", across every worker process.

Session-level locks die with their connection, so a SIGKILLed worker never leaves one behind: that is
also how the reconcile task tells a live race from a dead one (`is_locked`).
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterator

from django.db import connection


def lock_key(namespace: str, key: int) -> int:
    """One signed 64-bit lock key from the namespace and the whole id (ids are bigints: the two-int4
    form of the lock would overflow past 2**31, or alias ids that share their low 32 bits)."""
    digest = hashlib.blake2b(f"{namespace}:{int(key)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _try_lock(namespace: str, key: int) -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(%s::bigint)", [lock_key(namespace, key)])
        return bool(cursor.fetchone()[0])


def _unlock(namespace: str, key: int) -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_unlock(%s::bigint)", [lock_key(namespace, key)])


@contextlib.contextmanager
def advisory_lock(namespace: str, key: int, *, wait_seconds: float = 0) -> Iterator[bool]:
    """Yields whether the lock was taken (within `wait_seconds`); releases it on exit."""
    deadline = time.monotonic() + wait_seconds
    acquired = _try_lock(namespace, key)
    while not acquired and time.monotonic() < deadline:
        time.sleep(0.2)
        acquired = _try_lock(namespace, key)
    try:
        yield acquired
    finally:
        if acquired:
            _unlock(namespace, key)


def is_locked(namespace: str, key: int) -> bool:
    """Whether some session holds the lock now (taken and released at once if free)."""
    if _try_lock(namespace, key):
        _unlock(namespace, key)
        return False
    return True
