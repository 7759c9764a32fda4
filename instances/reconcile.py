"""The reconcile sweep (beat, every minute): the database and the providers must agree.

1. Every machine a provider lists under our label prefix must be owned: the current machine of an
   instance that holds one, a machine of a race still deciding (its attempt is live and the instance
   is racing), or the live CPU standby of an instance that keeps one (label `...-s<standby>`).
   Anything else is an orphan (a crashed worker's loser, a late create, a machine of a
   destroyed instance) and is destroyed. A machine held by an open UnreachableMachine row (silent, maybe
   holding unsaved work) is owned: it is destroyed only after its workspace is saved (instances/lost.py).
2. Work whose worker died is picked up again: a pending/launching/waking/hibernating/destroying/pausing/
   recovering/failback instance
   whose lifecycle lock nobody holds gets its task re-enqueued; each task resumes from the database
   (a race from its attempts, a hibernation from its snapshot).
"""

from __future__ import annotations

import logging
import re
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from dumont.core.locks import advisory_lock, is_locked
from dumont.core.loops import each_on_its_own
from instances.events import instance_event_add
from instances.locks import LOCK_NAMESPACE
from instances.models import Instance, InstanceEvent, StandbyMachine, UnreachableMachine
from instances.race import LIVE_OUTCOMES, RACING
from instances.states import HOLDS_MACHINE, KEEPS_STANDBY, Status, standby_transition
from machines.clients import clients_for_user
from machines.models import MachineAttempt
from machines.providers.base import ProviderError, ProviderInstance

log = logging.getLogger(__name__)
# statuses whose task resumes from the database (a race from its attempts, a hibernation from its snapshot)
# PAUSING: a pause whose provider was slow is run again (it waits for the provider's `stopped`)
RESUMABLE = frozenset({Status.PENDING, Status.LAUNCHING, Status.WAKING, Status.DESTROYING, Status.PAUSING,
                       Status.HIBERNATING, Status.RECOVERING, Status.FAILBACK})


def _parse_label(label: str | None) -> tuple[int, int, bool] | None:
    """(instance id, attempt or standby id, is a standby) from `<prefix><instance>-<attempt>` or `...-s<standby>`."""
    prefix = re.escape(settings.DUMONT_LABEL_PREFIX)
    match = re.fullmatch(rf"{prefix}(\d+)-(s?)(\d+)", label or "")
    return (int(match[1]), int(match[3]), bool(match[2])) if match else None


def machine_is_owned(machine: ProviderInstance, provider: str) -> bool:
    if UnreachableMachine.objects.filter(provider=provider, provider_instance_id=machine.instance_id,
                                         state=UnreachableMachine.State.OPEN).exists():
        return True  # silent, maybe holding unsaved work: kept until saved (instances/lost.py)
    parsed = _parse_label(machine.label)
    if parsed is None:
        return False
    instance_id, attempt_id, is_standby = parsed
    if is_standby:
        return StandbyMachine.objects.filter(
            pk=attempt_id, instance_id=instance_id, provider=provider, status__in=StandbyMachine.ACTIVE,
            instance__status__in=sorted(KEEPS_STANDBY), provider_instance_id__in=["", machine.instance_id],
        ).exists()
    instance = Instance.objects.filter(pk=instance_id, provider=provider).first()
    if instance is None:
        return False
    if instance.provider_instance_id == machine.instance_id and instance.status in HOLDS_MACHINE:
        return True
    if instance.status in RACING:
        return MachineAttempt.objects.filter(pk=attempt_id, instance=instance, outcome__in=LIVE_OUTCOMES).exists()
    return False


def reconcile_machines() -> list[str]:
    destroyed: list[str] = []
    for provider, account, client in clients_for_user():
        # one account's odd answer (or one odd machine) must not leave every other account's orphans running
        with each_on_its_own("reconcile", f"{provider} account {getattr(account, 'pk', None)}"):
            _reconcile_account(provider, client, destroyed)
    return destroyed


def _reconcile_account(provider: str, client, destroyed: list[str]) -> None:
    try:
        machines = client.list(label_prefix=settings.DUMONT_LABEL_PREFIX)
    except ProviderError as exc:
        log.warning("reconcile: cannot list %s machines: %s", provider, exc)
        return
    for machine in machines:
        with each_on_its_own("reconcile", f"{provider} machine {machine.instance_id}"):
            _reconcile_machine(provider, client, machine, destroyed)


def _reconcile_machine(provider: str, client, machine: ProviderInstance, destroyed: list[str]) -> None:
    if machine.status == "gone" or machine_is_owned(machine, provider):
        return
    try:
        client.destroy(machine.instance_id)
    except ProviderError as exc:
        log.warning("reconcile: cannot destroy orphan %s/%s: %s", provider, machine.instance_id, exc)
        return
    destroyed.append(f"{provider}:{machine.instance_id}")
    parsed = _parse_label(machine.label)
    MachineAttempt.objects.filter(provider=provider, provider_instance_id=machine.instance_id,
                                  destroyed_at__isnull=True).update(destroyed_at=timezone.now())
    now = timezone.now()
    for standby_id in StandbyMachine.objects.filter(provider=provider, provider_instance_id=machine.instance_id,
                                                    destroyed_at__isnull=True).values_list("pk", flat=True):
        # destroyed, not only dated: a `ready` row with a destroy date is skipped by standby_destroy and stayed
        # active forever (the standby row of a hibernated instance whose machine reconcile took as an orphan)
        if not standby_transition(standby_id, StandbyMachine.Status.DESTROYED, destroyed_at=now):
            StandbyMachine.objects.filter(pk=standby_id).update(destroyed_at=now)  # failed already: it keeps that
    instance = Instance.objects.filter(pk=parsed[0]).first() if parsed else None
    if instance is not None:
        instance_event_add(instance=instance, kind=InstanceEvent.Kind.RACE,
                           message=f"reconcile destroyed an unowned machine {machine.instance_id}",
                           data={"machine": machine.instance_id, "label": machine.label})
    log.info("reconcile: destroyed orphan %s/%s (%s)", provider, machine.instance_id, machine.label)


def dead_work() -> list[tuple[int, str]]:
    """(instance id, status) of the work whose worker died: the lifecycle lock is free and the status
    has not moved for RECONCILE_STALE_SECONDS. instances.tasks.reconcile re-enqueues each."""
    stale = Instance.objects.filter(
        status__in=sorted(RESUMABLE),
        # younger work may simply not have been picked up by a worker yet
        status_changed_at__lt=timezone.now() - timedelta(seconds=settings.RECONCILE_STALE_SECONDS),
    ).order_by("id")[:500]
    # a held lock: its worker is alive and at it
    return [(instance.pk, instance.status) for instance in stale if not is_locked(LOCK_NAMESPACE, instance.pk)]


def reconcile() -> dict:
    with advisory_lock("reconcile", 0) as acquired:
        if not acquired:
            return {"skipped": True}  # another beat's sweep is running
        resume = dead_work()
        return {"destroyed": reconcile_machines(), "resumed": [instance_id for instance_id, _ in resume],
                "resume": resume}
