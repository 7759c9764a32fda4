from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient
from rest_framework_simplejwt.settings import api_settings as jwt_settings
from rest_framework_simplejwt.tokens import AccessToken

from tests.factories import make_user

pytestmark = pytest.mark.django_db
PASSWORD = "correct-horse-battery"


def login(client: APIClient, **credentials):
    return client.post("/api/v1/auth/login", {"password": PASSWORD, **credentials}, format="json")


def test_login_with_username_or_email_returns_tokens_that_open_the_api():
    make_user("ada", email="Ada@Example.com")
    client = APIClient()
    for credentials in ({"username": "ada"}, {"username": "ada@example.com"}, {"email": "ADA@example.com"}):
        response = login(client, **credentials)
        assert response.status_code == 200, response.json()
        assert set(response.json()) == {"access", "refresh"}
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {response.json()['access']}")
    assert client.get("/api/v1/instances").status_code == 200


def test_bad_login_is_a_401_json_error():
    make_user("ada")
    response = APIClient().post("/api/v1/auth/login", {"username": "ada", "password": "nope"}, format="json")
    assert response.status_code == 401
    assert response.json()["error"] == "no_active_account"


def test_login_without_identity_names_the_field():
    response = APIClient().post("/api/v1/auth/login", {"password": PASSWORD}, format="json")
    assert response.status_code == 400
    assert "username" in response.json()["fields"]


def test_every_endpoint_but_login_requires_a_token():
    client = APIClient()
    for path in ("/api/v1/instances", "/api/v1/snapshots", "/api/v1/machines/history", "/api/v1/standby",
                 "/api/v1/provider-accounts", "/api/v1/ssh-keys"):
        response = client.get(path)
        assert response.status_code == 401, path
        assert response.json()["error"] == "not_authenticated"


def test_refresh_rotates_and_the_old_refresh_token_is_rejected():
    make_user("ada")
    client = APIClient()
    first = login(client, username="ada").json()
    rotated = client.post("/api/v1/auth/refresh", {"refresh": first["refresh"]}, format="json")
    assert rotated.status_code == 200
    assert rotated.json()["refresh"] != first["refresh"]
    replay = client.post("/api/v1/auth/refresh", {"refresh": first["refresh"]}, format="json")
    assert replay.status_code == 401
    assert replay.json()["error"] == "token_not_valid"
    assert client.post("/api/v1/auth/refresh", {"refresh": rotated.json()["refresh"]}, format="json").status_code == 200


def test_logout_blacklists_the_refresh_token():
    make_user("ada")
    client = APIClient()
    tokens = login(client, username="ada").json()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {tokens['access']}")
    assert client.post("/api/v1/auth/logout", {"refresh": tokens["refresh"]}, format="json").status_code == 204
    refresh = APIClient().post("/api/v1/auth/refresh", {"refresh": tokens["refresh"]}, format="json")
    assert refresh.status_code == 401


def test_logout_refuses_someone_elses_refresh_token():
    make_user("ada")
    make_user("bob")
    client = APIClient()
    ada = login(client, username="ada").json()
    bob = login(client, username="bob").json()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {ada['access']}")
    assert client.post("/api/v1/auth/logout", {"refresh": bob["refresh"]}, format="json").status_code == 400
    assert APIClient().post("/api/v1/auth/refresh", {"refresh": bob["refresh"]}, format="json").status_code == 200


def test_access_tokens_are_short_lived_and_expired_ones_are_401():
    assert jwt_settings.ACCESS_TOKEN_LIFETIME == timedelta(minutes=15)
    user = make_user("ada")
    token = AccessToken.for_user(user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    assert client.get("/api/v1/instances").status_code == 200
    # the same token, as it is 15 minutes and a second later
    token.set_exp(from_time=timezone.now() - timedelta(minutes=15, seconds=1))
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    response = client.get("/api/v1/instances")
    assert response.status_code == 401
    assert response.json()["error"] == "token_not_valid"
