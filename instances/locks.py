"""The instances app's locks, in one place.

- The lifecycle lock (`LOCK_NAMESPACE`, keyed by instance id): one task at a time acts on an
  instance's machine (a race, destroy, pause, hibernate, wake, recovery, failback). Reconcile reads
  it to tell live work from dead (`is_locked`).
- The standby lock (`STANDBY_LOCK`): one provisioning, sync or destroy of an instance's standby at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from dumont.core.errors import DomainError
from dumont.core.locks import advisory_lock
from instances.models import Instance

LOCK_NAMESPACE = "instance-lifecycle"
STANDBY_LOCK = "instance-standby"


class Busy(DomainError):
    """The lifecycle lock is held (a race is ending): the task retries later."""

    code = "busy"
    http_status = 409


@contextlib.contextmanager
def instance_locked(instance_id: int) -> Iterator[Instance]:
    """The instance, fresh from the database, while this task holds its lifecycle lock (the one a race
    holds). Raises Busy if the lock stays taken: the task retries later."""
    # a race notices a status change within one poll interval and lets go of the lock
    with advisory_lock(LOCK_NAMESPACE, instance_id, wait_seconds=30) as acquired:
        if not acquired:
            raise Busy(f"instance {instance_id} is busy")
        yield Instance.objects.select_related("provider_account", "owner").get(pk=instance_id)
