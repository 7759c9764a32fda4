"""The instance state machine: the only code that changes `Instance.status`.

`transition()` locks the row, refuses any move not in TRANSITIONS (or from a status other than the
caller expected) and writes exactly one `InstanceEvent` in the same transaction, so two workers
racing for the same move produce one winner and one event.
"""

from __future__ import annotations

import logging
from typing import Any

from django.db import transaction
from django.utils import timezone

from dumont.core.errors import Conflict
from instances.choices import ACTIVE, HOLDS_MACHINE, KEEPS_STANDBY, TERMINAL, Status
from instances.models import Instance, InstanceEvent, StandbyMachine, UnreachableMachine

log = logging.getLogger(__name__)

__all__ = ["ACTIVE", "HOLDS_MACHINE", "KEEPS_STANDBY", "TERMINAL", "TRANSITIONS", "IllegalTransition", "Status",
           "can_transition", "machine_assign", "transition", "MACHINE_FIELDS_CLEARED", "STANDBY_TRANSITIONS",
           "standby_transition"]

# what an instance forgets when its machine goes (destroyed, hibernated, lost)
MACHINE_FIELDS_CLEARED = {
    "provider_instance_id": "", "host_id": "", "ssh_host": "", "ssh_port": None, "ssh_host_key": "",
    "price_per_hour": None, "machine_started_at": None,
}

TRANSITIONS: dict[str, frozenset[str]] = {
    Status.PENDING: frozenset({Status.LAUNCHING, Status.FAILED, Status.DESTROYING}),
    Status.LAUNCHING: frozenset({Status.RUNNING, Status.FAILED, Status.DESTROYING}),
    Status.RUNNING: frozenset({Status.PAUSING, Status.PAUSED, Status.HIBERNATING, Status.FAILED, Status.DESTROYING,
                               Status.RECOVERING, Status.FAILOVER, Status.UNREACHABLE}),
    # a pause waits for the provider's `stopped`; one that never comes is retried, never judged lost
    Status.PAUSING: frozenset({Status.PAUSED, Status.RUNNING, Status.DESTROYING}),
    Status.PAUSED: frozenset({Status.RUNNING, Status.FAILED, Status.DESTROYING}),
    # answers again: running; the provider says it is gone: recovering; the user moves to the standby: failover
    Status.UNREACHABLE: frozenset({Status.RUNNING, Status.RECOVERING, Status.FAILOVER, Status.DESTROYING}),
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


def _locked(instance_id: int, expected: str | frozenset[str] | set[str] | None) -> Instance:
    """The instance's row, locked for this transaction; IllegalTransition unless it is in `expected`."""
    instance = Instance.objects.select_for_update().get(pk=instance_id)
    if expected is not None:
        allowed_from = {expected} if isinstance(expected, str) else set(expected)
        if instance.status not in allowed_from:
            raise IllegalTransition(
                f"instance {instance_id} is {instance.status}, expected {' or '.join(sorted(allowed_from))}",
                data={"status": instance.status},
            )
    return instance


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
    with transaction.atomic():
        instance = _locked(instance_id, expected)
        current = instance.status
        if not can_transition(current, target):
            raise IllegalTransition(
                f"instance {instance_id} cannot go from {current} to {target}", data={"status": current}
            )
        previous_machine = instance.ssh_host_key
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
        # the one log line per user-visible event (race won, hibernated, woke, failed, ...)
        line = f"instance {instance_id} {instance.name!r}: {current} -> {target}" + (f": {message}" if message else "")
        transaction.on_commit(lambda: log.info(line))
        _revoke_if_machine_changed(instance_id, previous_machine, fields)
    return instance


def machine_assign(instance_id: int, *, expected: str, **machine: Any) -> Instance:
    """Give an instance the machine its race won without changing its status (a wake, recovery or
    failback brings the workspace first, then `transition`s to running). Guarded like `transition`:
    refused unless the instance is still `expected`."""
    with transaction.atomic():
        instance = _locked(instance_id, expected)
        previous_machine = instance.ssh_host_key
        for name, value in machine.items():
            setattr(instance, name, value)
        instance.save(update_fields=["updated_at", *machine])
        _revoke_if_machine_changed(instance_id, previous_machine, machine)
    return instance


# A CPU standby (StandbyMachine) moves one way: provisioning -> ready, and either may fail or be destroyed.
STANDBY_TRANSITIONS: dict[str, frozenset[str]] = {
    StandbyMachine.Status.PROVISIONING: frozenset({StandbyMachine.Status.READY, StandbyMachine.Status.FAILED,
                                                   StandbyMachine.Status.DESTROYED}),
    StandbyMachine.Status.READY: frozenset({StandbyMachine.Status.FAILED, StandbyMachine.Status.DESTROYED}),
}


def standby_transition(standby_id: int, target: str, *, expected: str | None = None, **fields: Any) -> bool:
    """The one way a standby's status changes: one conditional UPDATE, so it happens only from a status
    that allows `target` (and is `expected`, when given). False when refused, e.g. a standby being made
    ready that was destroyed meanwhile with its instance."""
    allowed = [status for status, targets in STANDBY_TRANSITIONS.items() if target in targets
               and (expected is None or status == expected)]
    return bool(StandbyMachine.objects.filter(pk=standby_id, status__in=allowed).update(status=target, **fields))


def _revoke_if_machine_changed(instance_id: int, previous_host_key: str, fields: dict[str, Any]) -> None:
    if previous_host_key and "ssh_host_key" in fields and fields["ssh_host_key"] != previous_host_key:
        _machine_secrets_revoke(instance_id, new_host_key=fields["ssh_host_key"] or "")


def _machine_secrets_revoke(instance_id: int, *, new_host_key: str) -> None:
    """The instance's machine went (destroyed, hibernated, replaced): in the same transaction as the move,
    its agent secret stops working (heartbeats and storage keys) and its restic keys are revoked; their
    key files are deleted from the repository right after the commit (and by the retention sweep)."""
    from agent.services import agent_credential_revoke

    agent_credential_revoke(instance_id)
    _machine_keys_revoke(instance_id, current_host_key=new_host_key)


def machine_keys_settle(instance_id: int) -> None:
    """Revoke the restic keys of every machine the instance no longer holds (called when a kept unreachable
    machine is resolved: saved, gone or released)."""
    host_key = Instance.objects.filter(pk=instance_id).values_list("ssh_host_key", flat=True).first() or ""
    _machine_keys_revoke(instance_id, current_host_key=host_key)


def _machine_keys_revoke(instance_id: int, *, current_host_key: str) -> None:
    """Every key of the instance's machines but the current machine's and those of its kept unreachable
    machines (instances/lost.py snapshots such a machine with its own key before anything is destroyed)."""
    from machines.ssh import SSHTarget
    from snapshots.services import machine_keys_revoke, machine_of
    from snapshots.tasks import remove_machine_keys

    kept = [current_host_key, *UnreachableMachine.objects.filter(
        instance_id=instance_id, state=UnreachableMachine.State.OPEN).values_list("ssh_host_key", flat=True)]
    keep = tuple(machine_of(SSHTarget("", 22, "root", host_key)) for host_key in kept if host_key)
    if machine_keys_revoke(instance_id=instance_id, keep_machines=keep):
        transaction.on_commit(lambda: remove_machine_keys.apply_async(expires=600))
