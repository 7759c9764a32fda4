"""Rate limits: login per username and per client address, the API per user (heartbeats per instance:
tests/agent/test_api.py).
Counted in Redis (every web process counts together); a refused request is a 429 with Retry-After."""

import pytest
import redis
from django.conf import settings as django_settings
from rest_framework.test import APIClient

from tests.factories import make_user

pytestmark = pytest.mark.django_db
LOGIN = "/api/v1/auth/login"


def login(username: str, password: str = "wrong", address: str = "10.0.0.1", **headers):
    return APIClient().post(LOGIN, {"username": username, "password": password}, format="json",
                            REMOTE_ADDR=address, **headers)


def test_login_is_limited_per_username_from_any_address(settings):
    settings.THROTTLE_LOGIN_PER_USERNAME = "3/min"
    victim = make_user()
    for i in range(3):
        assert login(victim.username, address=f"10.0.0.{i}").status_code == 401
    refused = login(victim.username, "correct-horse-battery", address="10.9.9.9")
    assert refused.status_code == 429 and refused.json()["error"] == "throttled"
    assert 0 < int(refused["Retry-After"]) <= 60
    assert login(victim.username.upper(), address="10.9.9.8").status_code == 429  # the same account
    other = make_user()
    assert login(other.username, "correct-horse-battery", address="10.9.9.9").status_code == 200


def test_login_is_limited_per_client_address_whatever_it_claims(settings):
    settings.THROTTLE_LOGIN_PER_ADDRESS = "3/min"
    for i in range(3):
        assert login(f"guess-{i}", HTTP_X_FORWARDED_FOR=f"192.0.2.{i}").status_code == 401
    refused = login("guess-4", HTTP_X_FORWARDED_FOR="192.0.2.200")  # a forged header changes nothing
    assert refused.status_code == 429 and int(refused["Retry-After"]) > 0
    assert login("guess-5", address="10.0.0.2").status_code == 401  # another address is not limited


def test_the_api_is_limited_per_user_and_counted_in_redis(settings):
    settings.THROTTLE_API_PER_USER = "5/min"
    user, other = make_user(), make_user()
    api, other_api = APIClient(), APIClient()
    api.force_authenticate(user)
    other_api.force_authenticate(other)
    assert [api.get("/api/v1/instances").status_code for _ in range(5)] == [200] * 5
    refused = api.get("/api/v1/instances")
    assert refused.status_code == 429 and int(refused["Retry-After"]) > 0
    assert other_api.get("/api/v1/instances").status_code == 200
    # in Redis, where every process of every server counts together
    keys = redis.Redis.from_url(django_settings.REDIS_URL).keys(f"{django_settings.REDIS_KEY_PREFIX}:throttle:*")
    assert any(f"api-user_{user.pk}".encode() in key for key in keys)


def test_the_default_limits_leave_ordinary_use_alone():
    user = make_user()
    api = APIClient()
    api.force_authenticate(user)
    assert all(api.get("/api/v1/instances").status_code == 200 for _ in range(50))
    assert login(user.username, "correct-horse-battery").status_code == 200
