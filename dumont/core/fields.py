"""Secrets at rest: a text field stored Fernet-encrypted (provider keys, restic passwords, agent secrets).

The column holds only ciphertext; the value in Python is the plain string. Keys come from
`DUMONT_ENCRYPTION_KEYS` (first encrypts, all decrypt, so keys can be rotated); development derives
one from SECRET_KEY.
"""

from __future__ import annotations

import base64
import functools
import hashlib

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import models


@functools.cache
def _fernet() -> MultiFernet:
    keys = list(settings.DUMONT_ENCRYPTION_KEYS)
    if not keys:
        digest = hashlib.sha256(f"dumont-at-rest:{settings.SECRET_KEY}".encode()).digest()
        keys = [base64.urlsafe_b64encode(digest).decode()]
    try:
        return MultiFernet([Fernet(key) for key in keys])
    except ValueError as exc:
        raise ImproperlyConfigured("DUMONT_ENCRYPTION_KEYS must be Fernet keys (32 url-safe base64 bytes)") from exc


def encrypt(plaintext: str) -> str:
    return _fernet().encrypt(plaintext.encode()).decode()


def decrypt(ciphertext: str) -> str:
    try:
        return _fernet().decrypt(ciphertext.encode()).decode()
    except InvalidToken as exc:
        raise ImproperlyConfigured("a stored secret cannot be decrypted with DUMONT_ENCRYPTION_KEYS") from exc


class EncryptedTextField(models.TextField):
    """Never put one in a serializer's fields or an admin form: it is a secret."""

    def get_prep_value(self, value):
        if value is None or value == "":
            return value
        return encrypt(str(value))

    def from_db_value(self, value, expression, connection):
        if value is None or value == "":
            return value
        return decrypt(value)

    def to_python(self, value):
        return value
