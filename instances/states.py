"""The instance state machine: the only code that changes `Instance.status`.

`transition()` locks the row, refuses any move not in TRANSITIONS (or from a status other than the
caller expected) and writes exactly one `InstanceEvent` in the same transaction, so two workers
racing for the same move produce one winner and one event.
"""

from __future__ import annotations

from typing import Any

from django.db import models, transaction
from django.utils import timezone

from dumont.core.errors import Conflict


class Status(models.TextChoices):
    PENDING = "pending"
    LAUNCHING = "launching"
    RUNNING = "running"
    PAUSED = "paused"
    HIBERNATING = "hibernating"
    HIBERNATED = "hibernated"
    WAKING = "waking"
    FAILED = "failed"
    DESTROYING = "destroying"
    DESTROYED = "destroyed"
    # a lost GPU machine (instances/lost.py): racing for a new one, then the latest snapshot restored
    RECOVERING = "recovering"
    # a lost GPU machine with a CPU standby (instances/standby.py): the user works on the standby...
    FAILOVER = "failover"
    # ...until a new GPU is raced for and the standby's workspace copied back to it
    FAILBACK = "failback"


# Terminal: nothing is rented and nothing will happen on its own. A failed instance can still be
# destroyed by its owner (to release anything a provider may still hold), hence failed -> destroying.
# Destroying an instance keeps its snapshots: they are deleted through the snapshots API.
TERMINAL = frozenset({Status.FAILED, Status.DESTROYED})
ACTIVE = frozenset(set(Status) - TERMINAL)
# A provider machine is (or may be) rented in these states.
HOLDS_MACHINE = frozenset({Status.LAUNCHING, Status.RUNNING, Status.PAUSED, Status.HIBERNATING, Status.WAKING,
                           Status.RECOVERING, Status.FAILBACK})
# A CPU standby may exist (or be wanted) in these states; in any other its machine is destroyed.
KEEPS_STANDBY = frozenset({Status.RUNNING, Status.RECOVERING, Status.FAILOVER, Status.FAILBACK})

TRANSITIONS: dict[str, frozenset[str]] = {
    Status.PENDING: frozenset({Status.LAUNCHING, Status.FAILED, Status.DESTROYING}),
    Status.LAUNCHING: frozenset({Status.RUNNING, Status.FAILED, Status.DESTROYING}),
    Status.RUNNING: frozenset({Status.PAUSED, Status.HIBERNATING, Status.FAILED, Status.DESTROYING,
                               Status.RECOVERING, Status.FAILOVER}),
    Status.PAUSED: frozenset({Status.RUNNING, Status.FAILED, Status.DESTROYING}),
    # a failed snapshot leaves the machine alive and the instance running
    Status.HIBERNATING: frozenset({Status.HIBERNATED, Status.RUNNING, Status.FAILED, Status.DESTROYING}),
    Status.HIBERNATED: frozenset({Status.WAKING, Status.DESTROYING}),
    # a failed wake leaves the snapshot where it was: back to hibernated, nothing lost
    Status.WAKING: frozenset({Status.RUNNING, Status.HIBERNATED, Status.FAILED, Status.DESTROYING}),
    Status.FAILED: frozenset({Status.DESTROYING}),
    # a recovery that finds no machine leaves the workspace in its snapshot: hibernated, wake to retry
    Status.RECOVERING: frozenset({Status.RUNNING, Status.HIBERNATED, Status.DESTROYING}),
    Status.FAILOVER: frozenset({Status.FAILBACK, Status.RECOVERING, Status.DESTROYING}),
    # a failback that finds no GPU leaves the user on the standby
    Status.FAILBACK: frozenset({Status.RUNNING, Status.FAILOVER, Status.RECOVERING, Status.DESTROYING}),
    Status.DESTROYING: frozenset({Status.DESTROYED}),
    Status.DESTROYED: frozenset(),
}


class IllegalTransition(Conflict):
    code = "illegal_transition"


def can_transition(current: str, target: str) -> bool:
    return target in TRANSITIONS.get(current, frozenset())


def transition(
    instance_id: int,
    target: str,
    *,
    expected: str | frozenset[str] | set[str] | None = None,
    message: str = "",
    data: dict[str, Any] | None = None,
    **fields: Any,
):
    """Move an instance to `target`, atomically, and record it. Returns the updated instance.

    `expected`: the status(es) the caller believes the instance is in; anything else is refused
    (a service that acts on a stale read must not act). `fields`: other columns set in the same
    save (e.g. the machine that won a race).
    """
    from instances.models import Instance, InstanceEvent

    with transaction.atomic():
        instance = Instance.objects.select_for_update().get(pk=instance_id)
        current = instance.status
        if expected is not None:
            allowed_from = {expected} if isinstance(expected, str) else set(expected)
            if current not in allowed_from:
                raise IllegalTransition(
                    f"instance {instance_id} is {current}, expected {' or '.join(sorted(allowed_from))}",
                    data={"status": current},
                )
        if not can_transition(current, target):
            raise IllegalTransition(
                f"instance {instance_id} cannot go from {current} to {target}", data={"status": current}
            )
        instance.status = target
        instance.status_changed_at = timezone.now()
        if message:
            instance.status_reason = message
        for name, value in fields.items():
            setattr(instance, name, value)
        instance.save(update_fields=["status", "status_changed_at", "status_reason", "updated_at", *fields])
        InstanceEvent.objects.create(
            instance=instance,
            kind=InstanceEvent.Kind.STATUS,
            message=message or f"{current} -> {target}",
            data={"from": current, "to": target, **(data or {})},
        )
    return instance
