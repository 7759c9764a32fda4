"""Writes of the core app: accounts."""

from __future__ import annotations

import secrets

from django.contrib.auth import get_user_model
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from dumont.core.errors import Conflict, InvalidInput


def user_create(*, username: str, email: str = "", password: str | None = None, staff: bool = False):
    """A user who logs in with `username` (or `email`) and `password` (API, CLI; the admin when `staff`).
    No password given: one is generated. Returns (user, password): the caller shows the password once."""
    user_model = get_user_model()
    username = username.strip()
    if not username:
        raise InvalidInput("a username is required")
    password = password or secrets.token_urlsafe(12)
    if user_model.objects.filter(username=username).exists():
        raise Conflict(f"the user {username!r} exists")
    candidate = user_model(username=username, email=email, is_staff=staff)
    try:
        candidate.full_clean(exclude=["password"])
        validate_password(password, candidate)
    except ValidationError as exc:
        raise InvalidInput("; ".join(exc.messages)) from None
    if email and user_model.objects.filter(email__iexact=email).exists():
        raise Conflict(f"a user with the email {email!r} exists")  # login accepts the email: it must be unique
    try:
        with transaction.atomic():
            user = user_model.objects.create_user(username=username, email=email, password=password,
                                                  is_staff=staff)
    except IntegrityError:
        raise Conflict(f"the user {username!r} exists") from None
    return user, password
