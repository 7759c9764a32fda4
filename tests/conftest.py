import os

import pytest
import redis
from django.conf import settings
from rest_framework.test import APIClient
from rest_framework_simplejwt.tokens import RefreshToken

from tests.factories import make_user


def redis_per_xdist_worker() -> None:
    """Each xdist worker (gwN) gets its own Redis database (N+1) and key prefix, so the suite runs in parallel
    with nothing shared. Applied when this conftest loads (Django is set up, no Redis connection made yet);
    the worker's, beat's and web server's subprocesses inherit them through `dumont.processes.subprocess_env`."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        return
    from dumont.celery import app

    url = settings.REDIS_URL.rsplit("/", 1)[0] + f"/{1 + int(worker[2:]) % 15}"
    prefix = f"{settings.REDIS_KEY_PREFIX}-{worker}"
    broker_options = {**settings.CELERY_BROKER_TRANSPORT_OPTIONS, "global_keyprefix": f"{prefix}:"}
    result_options = {**settings.CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS, "global_keyprefix": f"{prefix}:"}
    settings.REDIS_URL = settings.CELERY_BROKER_URL = settings.CELERY_RESULT_BACKEND = url
    settings.REDIS_KEY_PREFIX = prefix
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = broker_options
    settings.CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS = result_options
    app.conf.update(broker_url=url, result_backend=url, broker_transport_options=broker_options,
                    result_backend_transport_options=result_options)


redis_per_xdist_worker()


@pytest.fixture(scope="session", autouse=True)
def _clean_worker_redis():
    """Each xdist worker owns a Redis database: start it empty (leftovers of an aborted run)."""
    if settings.REDIS_URL.rsplit("/", 1)[-1] != "0":
        redis.Redis.from_url(settings.REDIS_URL).flushdb()


@pytest.fixture(autouse=True)
def _fresh_rate_limits():
    """Each test starts with no request counted against any rate limit (they are kept in Redis)."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    keys = list(client.scan_iter(match=f"{settings.REDIS_KEY_PREFIX}:throttle:*", count=1000))
    if keys:
        client.delete(*keys)


@pytest.fixture
def user(db):
    return make_user()


@pytest.fixture
def other_user(db):
    return make_user()


def client_for(user) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {RefreshToken.for_user(user).access_token}")
    return client


@pytest.fixture
def api(user) -> APIClient:
    return client_for(user)


@pytest.fixture
def other_api(other_user) -> APIClient:
    return client_for(other_user)
