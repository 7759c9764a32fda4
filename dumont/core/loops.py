"""Loops over many tenants' objects (sweeps, recordings): one object's error must never stop the rest."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from celery.exceptions import SoftTimeLimitExceeded
from django.db import transaction

log = logging.getLogger(__name__)


@contextlib.contextmanager
def each_on_its_own(what: str, item: object) -> Iterator[None]:
    """The body of one iteration: an error is logged (with its traceback) and the loop goes on with the
    next item. Its own savepoint, so a database error leaves the caller's transaction usable. A task's
    time limit still ends the loop."""
    try:
        with transaction.atomic():
            yield
    except SoftTimeLimitExceeded:
        raise
    except Exception:
        log.exception("%s: %s failed, skipped (the others proceed)", what, item)
