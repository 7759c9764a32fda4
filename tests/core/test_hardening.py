"""Production refuses unsafe settings; advisory locks take whole 64-bit ids."""

import os
import subprocess
import sys
import threading

import pytest
from django.db import connection

from dumont.core.locks import advisory_lock, is_locked
from dumont.processes import REPO_ROOT

GOOD_KEY = "k" + "".join(chr(ord("a") + i % 26) for i in range(60))


def _settings_load(**env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in {"DEBUG", "SECRET_KEY", "LOCAL_MARKETPLACE_ENABLED"}}
    base.update({"DUMONT_ENV": "production", "DUMONT_ENCRYPTION_KEYS": "x" * 44, "ALLOWED_HOSTS": "dumont.example.com",
                 "SECRET_KEY": GOOD_KEY, "DJANGO_SETTINGS_MODULE": "dumont.settings", **env})
    return subprocess.run([sys.executable, "-c", "import django; django.setup()"], cwd=REPO_ROOT, env=base,
                          capture_output=True, text=True, timeout=60)


def test_production_starts_with_safe_settings():
    result = _settings_load()
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize(("env", "said"), [
    ({"DEBUG": "true"}, "DEBUG"),
    ({"SECRET_KEY": "short-secret"}, "SECRET_KEY"),
    ({"SECRET_KEY": "a" * 64}, "SECRET_KEY"),
    ({"LOCAL_MARKETPLACE_ENABLED": "true"}, "local marketplace"),
])
def test_production_refuses_to_start_with_unsafe_settings(env, said):
    result = _settings_load(**env)
    assert result.returncode != 0 and "ImproperlyConfigured" in result.stderr and said in result.stderr


def _seen_from_another_session(namespace: str, key: int) -> bool:
    """is_locked in another database session (a session's own locks are re-entrant for it)."""
    seen = []

    def look() -> None:
        seen.append(is_locked(namespace, key))
        connection.close()

    thread = threading.Thread(target=look)
    thread.start()
    thread.join(30)
    return seen[0]


@pytest.mark.django_db
def test_advisory_locks_take_whole_64_bit_ids():
    big = 2**40 + 7
    with advisory_lock("test-ns", big) as acquired:
        assert acquired and _seen_from_another_session("test-ns", big)
        assert not _seen_from_another_session("test-ns", 7)  # the same low 32 bits: another id, another lock
        assert not _seen_from_another_session("other-ns", big)
    assert not _seen_from_another_session("test-ns", big)
