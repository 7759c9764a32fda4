import pytest
import redis
from django.conf import settings
from rest_framework.test import APIClient
from rest_framework_simplejwt.tokens import RefreshToken

from tests.factories import make_user


@pytest.fixture(scope="session", autouse=True)
def _clean_worker_redis():
    """Each xdist worker owns a Redis database: start it empty (leftovers of an aborted run)."""
    if settings.REDIS_URL.rsplit("/", 1)[-1] != "0":
        redis.Redis.from_url(settings.REDIS_URL).flushdb()


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
