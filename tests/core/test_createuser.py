"""`manage.py createuser`: a second user for a newcomer, who logs in to the API with what it printed and
sees only their own instances."""

import io

import pytest
from django.core.management import CommandError, call_command
from rest_framework.test import APIClient

from tests.factories import make_instance, make_user

pytestmark = pytest.mark.django_db


def login(username: str, password: str):
    return APIClient().post("/api/v1/auth/login", {"username": username, "password": password}, format="json")


def test_createuser_prints_a_generated_password_that_logs_in(capsys):
    call_command("createuser", "bob", "--email", "bob@example.com")
    out = capsys.readouterr().out
    password = out.strip().rsplit("password=", 1)[1]
    assert len(password) >= 12

    response = login("bob", password)
    assert response.status_code == 200 and "access" in response.json()
    assert login("bob@example.com", password).status_code == 200  # login takes the email too

    # tenant isolation, as the newcomer wants to see it: bob does not see alice's instance
    alice_instance = make_instance(make_user(username="alice"))
    bob = APIClient()
    bob.credentials(HTTP_AUTHORIZATION=f"Bearer {response.json()['access']}")
    assert bob.get(f"/api/v1/instances/{alice_instance.pk}").status_code == 404
    assert bob.get("/api/v1/instances").json()["results"] == []


def test_createuser_takes_a_password_on_stdin_and_refuses_weak_ones_and_duplicates(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("a-long-enough-passphrase\n"))
    call_command("createuser", "carol", "--password-stdin", "--staff")
    assert "a-long-enough-passphrase" not in capsys.readouterr().out
    assert login("carol", "a-long-enough-passphrase").status_code == 200

    with pytest.raises(CommandError, match="exists"):
        call_command("createuser", "carol")
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    with pytest.raises(CommandError, match="too short"):
        call_command("createuser", "dave", "--password-stdin")


def test_operators_add_users_through_the_api_and_nobody_else_may(capsys):
    staff = make_user("ops")
    staff.is_staff = True
    staff.save()
    operator, plain = APIClient(), APIClient()
    operator.force_authenticate(staff)
    plain.force_authenticate(make_user("mallory"))

    refused = plain.post("/api/v1/users", {"username": "eve"}, format="json")
    assert refused.status_code == 403 and refused.json()["error"]
    created = operator.post("/api/v1/users", {"username": "erin", "email": "erin@example.com"}, format="json")
    assert created.status_code == 201, created.json()
    assert login("erin", created.json()["password"]).status_code == 200
    given = operator.post("/api/v1/users", {"username": "frank", "password": "a-long-enough-passphrase"},
                          format="json")
    assert given.status_code == 201 and "password" not in given.json()

    duplicate = operator.post("/api/v1/users", {"username": "erin"}, format="json")
    assert duplicate.status_code == 409 and duplicate.json()["error"] == "conflict"
    weak = operator.post("/api/v1/users", {"username": "gina", "password": "short"}, format="json")
    assert weak.status_code == 400 and "too short" in weak.json()["detail"]
