"""Lost GPU machines: detection and recovery.

- **Lost** = the agent's heartbeats stopped for longer than LOST_MACHINE_SECONDS *and* the machine is
  confirmed gone: the provider reports it gone / failed (exited, offline) / stopped, or SSH does not
  answer (two tries). Heartbeats alone never decide: a late heartbeat, a dead agent or a Redis outage
  on a machine that still answers is not a lost machine (the agent is redeployed instead). A lost
  machine is never idleness: it is never "hibernated".
- **On a lost machine**: its host gets a `machine_lost` attempt (a severe failure for its reliability)
  and is avoided by the recovery race; the machine is destroyed (it bills until destroyed and nothing on
  it is reachable); then either the instance fails over to its CPU standby (instances/standby.py), or it
  goes to `recovering`.
- **Recovery** (`recovering`): a launch race, the latest verified snapshot restored onto the winner, the
  agent restarted, `running` (instances/relaunch.py). The events say the recovery point (the snapshot's time, and how much work
  since then was lost) and how long recovery took. If no machine comes up, the instance goes to
  `hibernated`: its workspace waits in the snapshot and a wake tries again.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone

from dumont.core.locks import advisory_lock
from instances import agent_setup
from instances.events import instance_event_add
from instances.locks import LOCK_NAMESPACE, instance_locked
from instances.models import Instance, InstanceEvent, StandbyConfig, StandbyMachine
from instances.relaunch import relaunch
from instances.selectors import instances_silent
from instances.states import MACHINE_FIELDS_CLEARED, Status, transition
from machines import reliability
from machines.clients import provider_client
from machines.keys import control_plane_key_path
from machines.models import MachineAttempt
from machines.providers.base import STATUS_FAILED, STATUS_GONE, STATUS_STOPPED, ProviderError
from machines.ssh import SSHError, SSHTarget, connect
from snapshots.models import Snapshot
from snapshots.selectors import snapshot_latest_verified

log = logging.getLogger(__name__)
LOST_PROVIDER_STATUSES = (STATUS_GONE, STATUS_FAILED, STATUS_STOPPED)


# ---- detection -----------------------------------------------------------------------------


def lost_machine_sweep() -> dict:
    """Periodic (beat): the silent instances, each to be checked (instances.tasks.lost_machine_sweep enqueues
    the checks). The checks decide, each under its instance's lock; two sweeps at once do nothing twice."""
    with advisory_lock("lost-machine-sweep", 0) as acquired:
        if not acquired:
            return {"skipped": True}
        return {"checking": instances_silent()}


def _silence(instance: Instance, now: datetime) -> tuple[datetime | None, float]:
    """(last heartbeat, seconds of silence counted from it or, if none ever came, from the machine's start)."""
    from agent.selectors import last_heartbeat_at

    last = last_heartbeat_at(instance.pk)
    since = last or instance.machine_started_at or instance.status_changed_at
    return last, (now - since).total_seconds()


def machine_check_run(instance_id: int) -> str:
    """Decide whether a silent instance's machine is lost, and act. Returns lost / alive / skipped / busy."""
    with advisory_lock(LOCK_NAMESPACE, instance_id) as acquired:
        if not acquired:
            return "busy"  # a lifecycle task has the instance; the next sweep looks again
        instance = Instance.objects.select_related("provider_account", "owner").get(pk=instance_id)
        if instance.status != Status.RUNNING:
            return "skipped"
        now = timezone.now()
        last_heartbeat, silent_for = _silence(instance, now)
        if silent_for <= settings.LOST_MACHINE_SECONDS:
            return "alive"  # a late heartbeat came in meanwhile
        if instance.events.filter(kind=InstanceEvent.Kind.LOST, data__alive=True,
                                  created_at__gte=now - timedelta(seconds=settings.LOST_MACHINE_SECONDS)).exists():
            return "alive"  # confirmed alive lately: its agent is being brought back
        lost, reason, evidence = machine_verdict(instance)
        if not lost:
            instance_event_add(
                instance=instance, kind=InstanceEvent.Kind.LOST,
                message=f"no heartbeat for {silent_for:.0f}s, but the machine answers ({reason}): "
                        "not lost; restarting its agent",
                data={"alive": True, "silent_seconds": round(silent_for, 1), **evidence},
            )
            agent_setup.agent_start(instance)
            return "alive"
        machine_lost(instance, reason=reason, evidence=evidence, last_heartbeat=last_heartbeat, detected_at=now)
        return "lost"


def machine_verdict(instance: Instance) -> tuple[bool, str, dict]:
    """(lost?, why, evidence): the provider's word first, then SSH with the pinned host key."""
    provider = provider_client(instance.provider, instance.provider_account)
    target = instance.ssh_target
    evidence: dict = {}
    try:
        machine = provider.get(instance.provider_instance_id)
    except ProviderError as exc:
        evidence["provider_error"] = str(exc)[:300]  # the provider cannot say: SSH decides
    else:
        evidence["provider_status"] = machine.raw_status or machine.status
        if machine.status in LOST_PROVIDER_STATUSES:
            return True, f"the provider reports it {machine.raw_status or machine.status}", evidence
        if machine.ssh_ready:  # the provider may have moved its SSH port (a host reboot)
            target = SSHTarget(machine.ssh_host, machine.ssh_port, target.user, target.host_key)
    error: Exception | None = None
    for attempt in range(settings.LOST_SSH_TRIES):
        if attempt:
            time.sleep(1.0)
        try:
            with connect(target, control_plane_key_path(), connect_timeout=settings.LOST_SSH_TIMEOUT_SECONDS) as session:
                if session.run(["true"], timeout=settings.LOST_SSH_TIMEOUT_SECONDS).ok:
                    return False, "SSH answers", evidence
        except SSHError as exc:
            error = exc
    evidence["ssh_error"] = str(error)[:300]
    return True, f"SSH does not answer ({error})", evidence


def snapshot_point(snapshot: Snapshot) -> datetime:
    """The moment a snapshot holds the workspace as of: its backup's start."""
    if snapshot.finished_at and snapshot.duration_seconds:
        return snapshot.finished_at - timedelta(seconds=snapshot.duration_seconds)
    return snapshot.created_at


def machine_lost(instance: Instance, *, reason: str, evidence: dict, last_heartbeat: datetime | None,
                 detected_at: datetime) -> None:
    """Record the loss, destroy the lost machine, and move the instance to its standby (`failover`) or to
    `recovering` (instances.tasks.check_machine then enqueues what follows). The caller holds the instance's
    lifecycle lock and saw it `running`."""
    from instances import standby as standby_module

    lost = {"provider_instance_id": instance.provider_instance_id, "host_id": instance.host_id,
            "price_per_hour": str(instance.price_per_hour or 0)}
    MachineAttempt.objects.create(
        provider=instance.provider, host_id=instance.host_id, offer_id="", instance=instance, round=0,
        provider_instance_id=instance.provider_instance_id, gpu_name=instance.gpu_name,
        price_per_hour=instance.price_per_hour, outcome=MachineAttempt.Outcome.MACHINE_LOST,
        failure_stage=MachineAttempt.Stage.RUNTIME, detail=reason[:2000], finished_at=detected_at,
    )
    reliability.host_stats_update(provider=instance.provider, host_id=instance.host_id)
    heard = f"{(detected_at - last_heartbeat).total_seconds():.0f}s ago" if last_heartbeat else "never"
    instance_event_add(
        instance=instance, kind=InstanceEvent.Kind.LOST,
        message=f"machine {instance.host_id} lost: {reason}; last heartbeat {heard}",
        data={"lost": True, "reason": reason, **lost, **evidence, "detected_at": detected_at.isoformat(),
              "last_heartbeat_at": last_heartbeat.isoformat() if last_heartbeat else None},
    )
    standby = StandbyMachine.objects.filter(instance=instance, status=StandbyMachine.Status.READY).first()
    config = StandbyConfig.objects.filter(owner=instance.owner_id).first()
    if standby is not None and standby.last_sync_at and config is not None and config.auto_failover:
        standby_module.failover_to(instance, standby, lost=lost, reason=f"machine lost: {reason}",
                                   detected_at=detected_at, last_heartbeat=last_heartbeat)
    else:
        snapshot = snapshot_latest_verified(instance_id=instance.pk)
        transition(instance.pk, Status.RECOVERING, expected=Status.RUNNING,
                   message=f"machine lost ({reason}): recovering on a new machine",
                   data={"lost": lost, "snapshot": snapshot.pk if snapshot else None},
                   **MACHINE_FIELDS_CLEARED)
    _destroy_lost(instance, lost["provider_instance_id"])


def _destroy_lost(instance: Instance, machine_id: str) -> None:
    try:
        provider_client(instance.provider, instance.provider_account).destroy(machine_id)
    except ProviderError as exc:
        # no longer the instance's machine: the reconcile sweep destroys it as an orphan
        instance_event_add(instance=instance, kind=InstanceEvent.Kind.ERROR,
                           message=f"the lost machine {machine_id} could not be destroyed yet: {exc}")
        return
    MachineAttempt.objects.filter(instance=instance, provider_instance_id=machine_id,
                                  destroyed_at__isnull=True).update(destroyed_at=timezone.now())


# ---- recovery ------------------------------------------------------------------------------


def instance_recover_run(instance_id: int) -> str:
    """recovering -> (race, restore, agent) -> running. Resumable: a second delivery finds the race won."""
    with instance_locked(instance_id) as instance:
        if instance.status != Status.RECOVERING:
            return "skipped"
        lost_event = instance.events.filter(kind=InstanceEvent.Kind.LOST, data__lost=True).order_by("-id").first()
        lost_host = (lost_event.data.get("host_id") or "") if lost_event else ""
        snapshot = snapshot_latest_verified(instance_id=instance.pk)
        done = relaunch(instance.pk, expected=Status.RECOVERING, avoid_hosts=(lost_host,) if lost_host else (),
                        source="snapshot" if snapshot else None, snapshot_id=snapshot.pk if snapshot else None,
                        running_message="recovered on {host} in {seconds:.1f}s",
                        failed_message="recovery failed: restore failed ({error}); the snapshot is intact, "
                                       "wake the instance to try again")
        if done.outcome != "running":
            return done.outcome  # hibernated: its snapshot is untouched, a wake tries again
        point = recovery_point(snapshot, lost_event)
        instance_event_add(instance=instance, kind=InstanceEvent.Kind.RECOVERY, message=point["message"]
                           + f"; recovered in {done.timings['total']:.1f}s",
                           data={"timings": done.timings, **point["data"]})
        return "running"


def recovery_point(snapshot: Snapshot | None, lost_event: InstanceEvent | None) -> dict:
    """What the recovery brought back, and how much work since then was lost (up to the last heartbeat)."""
    last_alive = None
    if lost_event is not None:
        last_alive = lost_event.data.get("last_heartbeat_at") or lost_event.data.get("detected_at")
    last_alive_at = datetime.fromisoformat(last_alive) if last_alive else None
    if snapshot is None:
        return {"message": "recovery point: none (no verified snapshot): the workspace starts empty",
                "data": {"recovery_point": None, "snapshot": None, "work_lost_seconds": None}}
    point = snapshot_point(snapshot)
    lost_seconds = max(0.0, (last_alive_at - point).total_seconds()) if last_alive_at else None
    lost_text = f", {lost_seconds:.0f}s of work before the loss is lost" if lost_seconds is not None else ""
    return {
        "message": f"recovery point: snapshot {snapshot.restic_snapshot_id[:8]} of {point:%Y-%m-%d %H:%M:%S} UTC"
                   + lost_text,
        "data": {"recovery_point": point.isoformat(), "snapshot": snapshot.pk,
                 "work_lost_seconds": round(lost_seconds, 1) if lost_seconds is not None else None},
    }
