"""Plain helpers that build real rows (no mocks)."""

from __future__ import annotations

import itertools

from django.contrib.auth import get_user_model

from instances.models import Instance

_seq = itertools.count(1)


def make_user(username: str | None = None, *, password: str = "correct-horse-battery", email: str | None = None):
    username = username or f"user{next(_seq)}"
    return get_user_model().objects.create_user(
        username=username, email=email or f"{username}@example.com", password=password
    )


def make_instance(owner, *, status: str = "pending", **fields) -> Instance:
    """A row in any status (tests only: production code moves status through states.transition)."""
    fields.setdefault("name", f"box-{next(_seq)}")
    fields.setdefault("provider", "local")
    fields.setdefault("gpu_name", "RTX 4090")
    return Instance.objects.create(owner=owner, status=status, **fields)
