"""Destroy, pause and resume: the task bodies. Each runs under the instance's lifecycle lock (the one
the race holds), re-checks the status it expects, and is safe to run twice."""

from __future__ import annotations

import logging
import time

from django.conf import settings
from django.utils import timezone

from instances.events import instance_event_add
from instances.locks import instance_locked
from instances.models import InstanceEvent
from instances.states import MACHINE_FIELDS_CLEARED, Status, transition
from machines.clients import provider_client
from machines.keys import control_plane_key_path
from machines.models import MachineAttempt
from machines.providers.base import STATUS_FAILED, STATUS_GONE, STATUS_RUNNING, STATUS_STOPPED, ProviderError
from machines.ssh import SSHError, SSHTarget, wait_for_ssh

log = logging.getLogger(__name__)


def instance_destroy_run(instance_id: int) -> str:
    """Destroy every machine the instance has (its current one, any left from races, its standby) -> destroyed."""
    from instances.standby import standby_destroy

    with instance_locked(instance_id) as instance:
        if instance.status != Status.DESTROYING:
            return "skipped"
        provider = provider_client(instance.provider, instance.provider_account)
        machines = {m.instance_id for m in provider.list(label_prefix=f"{instance.label}-")}
        if instance.provider_instance_id:
            machines.add(instance.provider_instance_id)
        for machine_id in sorted(machines):
            provider.destroy(machine_id)  # idempotent; a provider error fails the task, which retries
        MachineAttempt.objects.filter(instance=instance, destroyed_at__isnull=True).exclude(
            provider_instance_id=""
        ).update(destroyed_at=timezone.now())
        standby_destroy(instance, reason="instance destroyed")  # it may live at another provider
        transition(instance.pk, Status.DESTROYED, expected=Status.DESTROYING,
                   message=f"destroyed ({len(machines)} machine(s) released)", **MACHINE_FIELDS_CLEARED)
        return "destroyed"


def instance_pause_run(instance_id: int) -> str:
    """running -> pausing -> (the provider stops the machine; it keeps its disk; GPU billing stops) -> paused.

    `pausing` is never judged by the lost sweep (a stopping machine is silent by design). A stop that does
    not finish in time leaves it `pausing`; reconcile runs this again until the provider says `stopped`."""
    with instance_locked(instance_id) as instance:
        if instance.status == Status.RUNNING:
            instance = transition(instance.pk, Status.PAUSING, expected=Status.RUNNING, message="pausing")
        if instance.status != Status.PAUSING:
            return "skipped"
        provider = provider_client(instance.provider, instance.provider_account)
        provider.stop(instance.provider_instance_id)  # idempotent: a second stop of a stopping machine is fine
        machine = _wait_for_status(provider, instance.provider_instance_id, {STATUS_STOPPED})
        if machine is None:
            instance_event_add(instance=instance, kind=InstanceEvent.Kind.ERROR,
                               message="pause: the provider did not stop the machine in time; still pausing, "
                                       "tried again")
            return "timeout"
        transition(instance.pk, Status.PAUSED, expected=Status.PAUSING, message="paused (machine stopped)")
        return "paused"


def instance_resume_run(instance_id: int) -> str:
    """Start the stopped machine again and wait until it answers SSH with its pinned key -> running."""
    with instance_locked(instance_id) as instance:
        if instance.status != Status.PAUSED:
            return "skipped"
        provider = provider_client(instance.provider, instance.provider_account)
        provider.start(instance.provider_instance_id)
        machine = _wait_for_status(provider, instance.provider_instance_id, {STATUS_RUNNING}, need_ssh=True)
        if machine is None:
            # e.g. vast.ai: the GPU was taken meanwhile and the start hangs in "scheduling"
            provider.stop(instance.provider_instance_id)
            instance_event_add(instance=instance, kind=InstanceEvent.Kind.ERROR,
                               message="resume: the machine did not come back in time; it stays paused")
            return "timeout"
        # same machine, same host key; the port may have changed
        target = SSHTarget(machine.ssh_host, machine.ssh_port, instance.ssh_user or "root", instance.ssh_host_key)
        try:
            wait_for_ssh(target, control_plane_key_path(),
                         time.monotonic() + settings.RACE_SSH_TIMEOUT_SECONDS).close()
        except SSHError as exc:
            provider.stop(instance.provider_instance_id)
            instance_event_add(instance=instance, kind=InstanceEvent.Kind.ERROR,
                               message=f"resume: SSH did not answer ({exc}); the machine stays paused")
            return "ssh-failed"
        transition(instance.pk, Status.RUNNING, expected=Status.PAUSED, message="resumed",
                   data={"price_per_hour": str(instance.price_per_hour or 0), "gpu_name": instance.gpu_name},
                   ssh_host=machine.ssh_host, ssh_port=machine.ssh_port)
        return "running"


def _wait_for_status(provider, machine_id: str, wanted: set[str], *, need_ssh: bool = False):
    deadline = time.monotonic() + settings.MACHINE_ACTION_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        try:
            machine = provider.get(machine_id)
        except ProviderError as exc:
            if not exc.retryable:
                raise
            machine = None
        if machine is not None:
            if machine.status in wanted and (not need_ssh or machine.ssh_ready):
                return machine
            if machine.status in (STATUS_FAILED, STATUS_GONE):
                return None
        time.sleep(settings.RACE_POLL_INTERVAL_SECONDS)
    return None
