import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command

pytestmark = pytest.mark.django_db


def test_creates_the_admin_once_and_prints_credentials_once(monkeypatch, capsys):
    monkeypatch.setenv("DUMONT_ADMIN_USER", "root-op")
    monkeypatch.setenv("DUMONT_ADMIN_PASSWORD", "s3cret-pass")
    call_command("ensure_admin")
    assert "s3cret-pass" in capsys.readouterr().out
    call_command("ensure_admin")
    assert "s3cret-pass" not in capsys.readouterr().out
    admin = get_user_model().objects.get(username="root-op")
    assert admin.is_superuser and admin.check_password("s3cret-pass")


def test_production_has_no_default_admin(monkeypatch, settings):
    monkeypatch.delenv("DUMONT_ADMIN_USER", raising=False)
    monkeypatch.delenv("DUMONT_ADMIN_PASSWORD", raising=False)
    settings.PRODUCTION = True
    with pytest.raises(CommandError):
        call_command("ensure_admin")
    assert not get_user_model().objects.exists()
