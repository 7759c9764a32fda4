"""Lost and unreachable GPU machines: detection, what is kept, what is destroyed, recovery.

A silent instance (no heartbeat for LOST_MACHINE_SECONDS) is checked: the provider's word first, then SSH
with the pinned host key. The verdicts, and what each destroys:

- **alive** (SSH answers): not lost; its agent is restarted. Nothing destroyed.
- **lost** (the provider says the machine is gone, or failed for good: `offline`/`unknown`): its
  host gets a `machine_lost` attempt (counted against the host fleet-wide only when the provider reports
  a host-side failure, `failed`; otherwise only in its owner's view), the machine is destroyed (nothing
  on it is reachable any more), then the instance fails over to its CPU standby (auto_failover) or goes
  to `recovering`, which restores whichever copy is newer: the standby's mirror or the latest verified
  snapshot. The only verdict that destroys a machine without saving its workspace first.
- **unreachable** (the provider reports it running, or cannot say, and SSH does not answer; or it
  reports it stopped or `exited` with its disk, which is then started again): the machine may hold unsaved work and
  is **kept**: an `UnreachableMachine` row holds it (reconcile counts it as owned). With a ready standby
  and auto_failover the user fails over to the standby; otherwise the instance is `unreachable`. Every
  sweep re-checks it: once it answers, its workspace is snapshotted first, then it goes back to work
  (`unreachable` -> `running`) or, if the user moved to the standby, it is destroyed only after that
  snapshot is verified. After UNREACHABLE_GRACE_SECONDS it is flagged for the operator (an
  OperatorAlert), never destroyed on its own.
- **fleet-wide silence**: when more than LOST_FLEET_SILENT_SHARE of the running instances (and at least
  LOST_FLEET_SILENT_MIN) are silent in one sweep, the likeliest cause is our own network: the sweep
  judges nobody, logs an error and records an operator alert, and looks again next sweep.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone

from dumont.core.errors import Conflict
from dumont.core.locks import advisory_lock
from instances import agent_setup
from instances.events import events_for, instance_event_add, operator_alert
from instances.locks import LOCK_NAMESPACE, instance_locked
from instances.models import (
    Instance,
    InstanceEvent,
    OperatorAlert,
    StandbyConfig,
    StandbyMachine,
    UnreachableMachine,
)
from instances.relaunch import relaunch
from instances.selectors import active_standby, instances_silent
from instances.standby import failover_to
from instances.states import MACHINE_FIELDS_CLEARED, Status, machine_keys_settle, transition
from machines import reliability
from machines.clients import provider_client
from machines.keys import control_plane_key_path
from machines.models import MachineAttempt
from machines.providers.base import STATUS_FAILED, STATUS_GONE, STATUS_STOPPED, ProviderError
from machines.ssh import SSHError, SSHTarget, connect
from snapshots import services as snapshot_services
from snapshots.models import Snapshot
from snapshots.selectors import snapshot_latest_verified

log = logging.getLogger(__name__)
ALIVE, LOST, UNREACHABLE, STOPPED = "alive", "lost", "unreachable", "stopped"
# vast's `exited` on a machine that ran: the container stopped, its disk is kept and it can be started
RESTARTABLE_RAW_STATUSES = ("exited",)


# ---- detection -----------------------------------------------------------------------------


def lost_machine_sweep() -> dict:
    """Periodic (beat): the silent instances to check and the unreachable machines to re-check
    (instances.tasks.lost_machine_sweep enqueues both). The checks decide, each under its instance's lock;
    two sweeps at once do nothing twice. Many silent at once is our own outage until shown otherwise:
    nobody is judged."""
    with advisory_lock("lost-machine-sweep", 0) as acquired:
        if not acquired:
            return {"skipped": True}
        silent = instances_silent()
        running = Instance.objects.filter(status=Status.RUNNING).count()
        # going silent together: past half the threshold, so machines cut off a heartbeat apart count together
        going_silent = instances_silent(seconds=settings.LOST_MACHINE_SECONDS / 2) if silent else []
        if fleet_silent(len(going_silent), running):
            message = (f"{len(going_silent)} of {running} running instances went silent at once: likely our own "
                       "network; no machine is judged until they answer again")
            log.error("lost-machine sweep: %s", message)
            operator_alert(kind=OperatorAlert.Kind.FLEET_SILENT, key="fleet-silent", message=message,
                           data={"silent": going_silent[:100], "running": running})
            silent = []
        else:
            OperatorAlert.objects.filter(key="fleet-silent", resolved_at__isnull=True).update(resolved_at=timezone.now())
        rechecking = list(UnreachableMachine.objects.filter(state=UnreachableMachine.State.OPEN)
                          .order_by("id").values_list("id", flat=True)[:500])
        return {"checking": silent, "rechecking": rechecking}


def fleet_silent(silent: int, running: int) -> bool:
    return silent >= settings.LOST_FLEET_SILENT_MIN and silent > settings.LOST_FLEET_SILENT_SHARE * running


def _silence(instance: Instance, now: datetime) -> tuple[datetime | None, float]:
    """(last heartbeat, seconds of silence counted from it or, if none ever came, from the machine's start)."""
    from agent.selectors import last_heartbeat_at

    last = last_heartbeat_at(instance.pk)
    since = last or instance.machine_started_at or instance.status_changed_at
    return last, (now - since).total_seconds()


def machine_check_run(instance_id: int) -> str:
    """Judge a silent running instance's machine, and act. Returns alive / lost / unreachable / skipped / busy."""
    with advisory_lock(LOCK_NAMESPACE, instance_id) as acquired:
        if not acquired:
            return "busy"  # a lifecycle task has the instance; the next sweep looks again
        instance = Instance.objects.select_related("provider_account", "owner").get(pk=instance_id)
        if instance.status != Status.RUNNING:
            return "skipped"  # paused, pausing, hibernating...: a stopped machine is silent by design
        now = timezone.now()
        last_heartbeat, silent_for = _silence(instance, now)
        if silent_for <= settings.LOST_MACHINE_SECONDS:
            return "alive"  # a late heartbeat came in meanwhile
        if instance.events.filter(kind=InstanceEvent.Kind.LOST, data__alive=True,
                                  created_at__gte=now - timedelta(seconds=settings.LOST_MACHINE_SECONDS)).exists():
            return "alive"  # confirmed alive lately: its agent is being brought back
        verdict, reason, evidence = machine_verdict(instance.provider, instance.provider_account,
                                                    instance.provider_instance_id, instance.ssh_target)
        if verdict == ALIVE:
            instance_event_add(
                instance=instance, kind=InstanceEvent.Kind.LOST,
                message=f"no heartbeat for {silent_for:.0f}s, but the machine answers ({reason}): "
                        "not lost; restarting its agent",
                data={"alive": True, "silent_seconds": round(silent_for, 1), **evidence},
            )
            agent_setup.agent_start(instance)
            return "alive"
        if verdict == LOST:
            machine_lost(instance, reason=reason, evidence=evidence, last_heartbeat=last_heartbeat, detected_at=now)
            return "lost"
        machine_unreachable(instance, reason=reason, evidence=evidence, last_heartbeat=last_heartbeat,
                            detected_at=now, stopped=verdict == STOPPED)
        return "unreachable"


def machine_verdict(provider_name: str, account, machine_id: str, target: SSHTarget) -> tuple[str, str, dict]:
    """(alive / lost / stopped / unreachable, why, evidence): the provider's word first, then SSH with the
    pinned host key. Only the provider can make it `lost`; SSH alone never does."""
    provider = provider_client(provider_name, account)
    evidence: dict = {}
    try:
        machine = provider.get(machine_id)
    except ProviderError as exc:
        evidence["provider_error"] = str(exc)[:300]  # the provider cannot say: SSH decides alive or unreachable
    else:
        raw = machine.raw_status or machine.status
        evidence["provider_status"] = raw
        if machine.status == STATUS_STOPPED or (machine.status == STATUS_FAILED and raw in RESTARTABLE_RAW_STATUSES):
            return STOPPED, f"the provider reports it {raw} (its disk is kept)", evidence
        if machine.status in (STATUS_GONE, STATUS_FAILED):
            evidence["host_fault_confirmed"] = machine.status == STATUS_FAILED
            return LOST, f"the provider reports it {raw}", evidence
        if machine.ssh_ready:  # the provider may have moved its SSH port (a host reboot)
            target = SSHTarget(machine.ssh_host, machine.ssh_port, target.user, target.host_key)
    error: Exception | None = None
    for attempt in range(settings.LOST_SSH_TRIES):
        if attempt:
            time.sleep(1.0)
        try:
            with connect(target, control_plane_key_path(), connect_timeout=settings.LOST_SSH_TIMEOUT_SECONDS) as session:
                if session.run(["true"], timeout=settings.LOST_SSH_TIMEOUT_SECONDS).ok:
                    evidence["ssh"] = {"host": target.host, "port": target.port}
                    return ALIVE, "SSH answers", evidence
        except SSHError as exc:
            error = exc
    evidence["ssh_error"] = str(error)[:300]
    return UNREACHABLE, f"SSH does not answer ({error})", evidence


def snapshot_point(snapshot: Snapshot) -> datetime:
    """The moment a snapshot holds the workspace as of: what its backup captured (restic's time)."""
    if snapshot.captured_at:
        return snapshot.captured_at
    if snapshot.finished_at and snapshot.duration_seconds:
        return snapshot.finished_at - timedelta(seconds=snapshot.duration_seconds)
    return snapshot.created_at


def _machine_of(instance: Instance) -> dict:
    return {"provider_instance_id": instance.provider_instance_id, "host_id": instance.host_id,
            "price_per_hour": str(instance.price_per_hour or 0)}


def _record_host_failure(instance: Instance, *, outcome: str, reason: str, confirmed: bool, at: datetime) -> None:
    MachineAttempt.objects.create(
        provider=instance.provider, host_id=instance.host_id, offer_id="", instance=instance, round=0,
        provider_instance_id=instance.provider_instance_id, gpu_name=instance.gpu_name,
        price_per_hour=instance.price_per_hour, outcome=outcome, host_fault_confirmed=confirmed,
        failure_stage=MachineAttempt.Stage.RUNTIME, detail=reason[:2000], finished_at=at,
    )
    if confirmed:
        reliability.host_stats_update(provider=instance.provider, host_id=instance.host_id)
    else:
        reliability.owner_failures_update(provider=instance.provider, host_id=instance.host_id,
                                          owner_id=instance.owner_id)


def machine_lost(instance: Instance, *, reason: str, evidence: dict, last_heartbeat: datetime | None,
                 detected_at: datetime) -> None:
    """The provider says the machine is gone: record it, destroy it, and move the instance to its standby
    (`failover`) or to `recovering` (instances.tasks then enqueues what follows). The caller holds the
    instance's lifecycle lock and saw it `running` or `unreachable`."""
    lost = _machine_of(instance)
    _record_host_failure(instance, outcome=MachineAttempt.Outcome.MACHINE_LOST, reason=reason,
                         confirmed=bool(evidence.get("host_fault_confirmed")), at=detected_at)
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
        failover_to(instance, standby, lost=lost, reason=f"machine lost: {reason}",
                                   detected_at=detected_at, last_heartbeat=last_heartbeat)
    else:
        snapshot = snapshot_latest_verified(instance_id=instance.pk)
        transition(instance.pk, Status.RECOVERING, expected={Status.RUNNING, Status.UNREACHABLE},
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


# ---- unreachable: kept, re-checked, saved before anything is destroyed -----------------------------


def machine_unreachable(instance: Instance, *, reason: str, evidence: dict, last_heartbeat: datetime | None,
                        detected_at: datetime, stopped: bool) -> UnreachableMachine:
    """Keep the silent machine (an UnreachableMachine row holds it), start it again if the provider stopped
    it, and let the user work on: on the standby (auto_failover), else the instance is `unreachable`.
    The caller holds the lifecycle lock and saw the instance `running`."""
    machine = _machine_of(instance)
    _record_host_failure(instance, outcome=MachineAttempt.Outcome.UNREACHABLE, reason=reason, confirmed=False,
                         at=detected_at)
    row = UnreachableMachine.objects.create(
        instance=instance, provider=instance.provider, provider_account=instance.provider_account,
        provider_instance_id=instance.provider_instance_id, host_id=instance.host_id, ssh_host=instance.ssh_host,
        ssh_port=instance.ssh_port, ssh_user=instance.ssh_user, ssh_host_key=instance.ssh_host_key,
        price_per_hour=instance.price_per_hour, reason=reason[:2000], last_checked_at=detected_at,
    )
    heard = f"{(detected_at - last_heartbeat).total_seconds():.0f}s ago" if last_heartbeat else "never"
    instance_event_add(
        instance=instance, kind=InstanceEvent.Kind.LOST,
        message=f"machine {instance.host_id} unreachable: {reason}; last heartbeat {heard}. It is kept (it may hold "
                "unsaved work) and re-checked every sweep",
        data={"unreachable": True, "row": row.pk, "reason": reason, **machine, **evidence,
              "detected_at": detected_at.isoformat(),
              "last_heartbeat_at": last_heartbeat.isoformat() if last_heartbeat else None},
    )
    standby = StandbyMachine.objects.filter(instance=instance, status=StandbyMachine.Status.READY).first()
    config = StandbyConfig.objects.filter(owner=instance.owner_id).first()
    if standby is not None and standby.last_sync_at and config is not None and config.auto_failover:
        failover_to(instance, standby, lost=machine, reason=f"machine unreachable: {reason}",
                                   detected_at=detected_at, last_heartbeat=last_heartbeat)
    else:
        transition(instance.pk, Status.UNREACHABLE, expected=Status.RUNNING,
                   message=f"machine unreachable ({reason}): kept and re-checked; nothing is destroyed",
                   data={"row": row.pk})
    if stopped:
        _start_stopped(row, instance)
    return row


def _start_stopped(row: UnreachableMachine, instance: Instance) -> None:
    try:
        provider_client(row.provider, row.provider_account).start(row.provider_instance_id)
    except ProviderError as exc:
        instance_event_add(instance=instance, kind=InstanceEvent.Kind.ERROR,
                           message=f"the stopped machine {row.provider_instance_id} could not be started yet: {exc}")
        return
    instance_event_add(instance=instance, kind=InstanceEvent.Kind.LOST,
                       message=f"the provider stopped machine {row.provider_instance_id} (disk kept): starting it "
                               "again to save its workspace", data={"row": row.pk, "started": True})


def unreachable_recheck_run(row_id: int) -> str:
    """One re-check of a kept machine. Returns saved / running / gone / waiting / busy / skipped."""
    row = UnreachableMachine.objects.filter(pk=row_id).first()
    if row is None:
        return "skipped"
    with advisory_lock(LOCK_NAMESPACE, row.instance_id) as acquired:
        if not acquired:
            return "busy"
        row.refresh_from_db()
        if row.state != UnreachableMachine.State.OPEN:
            return "skipped"
        instance = Instance.objects.select_related("provider_account", "owner").get(pk=row.instance_id)
        holds = instance.status == Status.UNREACHABLE and instance.provider_instance_id == row.provider_instance_id
        verdict, reason, evidence = machine_verdict(row.provider, row.provider_account, row.provider_instance_id,
                                                    row.ssh_target)
        now = timezone.now()
        UnreachableMachine.objects.filter(pk=row.pk).update(checks=row.checks + 1, last_checked_at=now)
        if verdict == LOST:
            _resolve(row, UnreachableMachine.State.GONE)
            if holds:
                machine_lost(instance, reason=reason, evidence=evidence, last_heartbeat=None, detected_at=now)
            else:
                instance_event_add(instance=instance, kind=InstanceEvent.Kind.LOST,
                                   message=f"the unreachable machine {row.provider_instance_id} is gone: {reason}",
                                   data={"row": row.pk, **evidence})
            return "gone"
        if verdict == ALIVE:
            if "ssh" in evidence:  # the provider moved its SSH port
                row.ssh_host, row.ssh_port = evidence["ssh"]["host"], evidence["ssh"]["port"]
            return _answered(row, instance, holds=holds)
        if verdict == STOPPED:
            _start_stopped(row, instance)
        if row.flagged_at is None and now - row.created_at >= timedelta(seconds=settings.UNREACHABLE_GRACE_SECONDS):
            UnreachableMachine.objects.filter(pk=row.pk).update(flagged_at=now)
            message = (f"machine {row.provider}:{row.provider_instance_id} of instance {instance.pk} unreachable for "
                       f"{(now - row.created_at).total_seconds():.0f}s ({reason}); kept, as it may hold unsaved work: "
                       "an operator decides")
            operator_alert(kind=OperatorAlert.Kind.UNREACHABLE, key=f"unreachable:{row.pk}", message=message,
                           data={"row": row.pk, **evidence}, instance=instance)
            instance_event_add(instance=instance, kind=InstanceEvent.Kind.LOST, message=message,
                               data={"row": row.pk, "flagged": True})
        return "waiting"


def _answered(row: UnreachableMachine, instance: Instance, *, holds: bool) -> str:
    """The kept machine answers again: its workspace is snapshotted first. Still the instance's machine:
    back to work (even if that snapshot failed: nothing is destroyed). Otherwise (the user moved to the
    standby) it is destroyed only once that snapshot is verified."""
    on_event = events_for(instance)
    try:
        snapshot = snapshot_services.snapshot_take(owner=instance.owner, instance_id=instance.pk,
                                                   target=row.ssh_target, reason=Snapshot.Reason.UNREACHABLE,
                                                   on_event=on_event, read_back=not holds)  # a destroy may follow
    except Conflict as exc:  # a snapshot of it is in progress already: the next sweep looks again
        log.warning("unreachable machine %s answered, snapshot not taken: %s", row.pk, exc)
        snapshot = None
    saved = snapshot is not None and snapshot.status == Snapshot.Status.VERIFIED
    if holds:
        transition(instance.pk, Status.RUNNING, expected=Status.UNREACHABLE,
                   message="the machine answers again" + (f"; its workspace saved as snapshot {snapshot.pk}"
                                                          if saved else "; its snapshot failed, it keeps running"),
                   data={"price_per_hour": str(instance.price_per_hour or 0), "gpu_name": instance.gpu_name,
                         "row": row.pk, "snapshot": snapshot.pk if snapshot else None},
                   ssh_host=row.ssh_host, ssh_port=row.ssh_port)
        _resolve(row, UnreachableMachine.State.SAVED)
        instance.refresh_from_db()
        agent_setup.agent_start(instance)
        return "running"
    if not saved:
        return "waiting"  # never destroyed unsaved: the next sweep tries again
    try:
        provider_client(row.provider, row.provider_account).destroy(row.provider_instance_id)
    except ProviderError as exc:
        instance_event_add(instance=instance, kind=InstanceEvent.Kind.ERROR,
                           message=f"the saved machine {row.provider_instance_id} could not be destroyed yet: {exc}")
        return "waiting"
    _resolve(row, UnreachableMachine.State.SAVED)
    MachineAttempt.objects.filter(instance=instance, provider_instance_id=row.provider_instance_id,
                                  destroyed_at__isnull=True).update(destroyed_at=timezone.now())
    instance_event_add(instance=instance, kind=InstanceEvent.Kind.LOST,
                       message=f"the unreachable machine {row.provider_instance_id} answered again: its workspace is "
                               f"saved as snapshot {snapshot.pk}, then the machine was destroyed",
                       data={"row": row.pk, "snapshot": snapshot.pk, "saved": True})
    return "saved"


def _resolve(row: UnreachableMachine, state: str) -> None:
    now = timezone.now()
    UnreachableMachine.objects.filter(pk=row.pk, state=UnreachableMachine.State.OPEN).update(state=state,
                                                                                          resolved_at=now)
    OperatorAlert.objects.filter(key=f"unreachable:{row.pk}", resolved_at__isnull=True).update(resolved_at=now)
    machine_keys_settle(row.instance_id)  # a kept machine's restic key lived on only to save its workspace


# ---- recovery ------------------------------------------------------------------------------


def instance_recover_run(instance_id: int) -> str:
    """recovering -> (race, the newer of the standby's mirror and the latest snapshot, agent) -> running.
    Resumable: a second delivery finds the race won."""
    with instance_locked(instance_id) as instance:
        if instance.status != Status.RECOVERING:
            return "skipped"
        lost_event = instance.events.filter(kind=InstanceEvent.Kind.LOST, data__lost=True).order_by("-id").first()
        lost_host = (lost_event.data.get("host_id") or "") if lost_event else ""
        snapshot = snapshot_latest_verified(instance_id=instance.pk)
        mirror = _newer_mirror(instance, snapshot)  # later work than the snapshot: it wins
        source = "mirror" if mirror is not None else ("snapshot" if snapshot else None)
        done = relaunch(instance.pk, expected=Status.RECOVERING, avoid_hosts=(lost_host,) if lost_host else (),
                        source=source, snapshot_id=snapshot.pk if snapshot else None, standby=mirror,
                        running_message="recovered on {host} in {seconds:.1f}s",
                        failed_message="recovery failed: restore failed ({error}); the snapshot is intact, "
                                       "wake the instance to try again")
        if done.outcome != "running":
            return done.outcome  # hibernated: its snapshot is untouched, a wake tries again
        if "mirror_error" in done.detail:
            mirror = None  # the pull failed: the snapshot was restored instead
        point = recovery_point(snapshot, lost_event, mirror=mirror)
        instance_event_add(instance=instance, kind=InstanceEvent.Kind.RECOVERY, message=point["message"]
                           + f"; recovered in {done.timings['total']:.1f}s",
                           data={"timings": done.timings, **point["data"]})
        return "running"


def _newer_mirror(instance: Instance, snapshot: Snapshot | None) -> StandbyMachine | None:
    """The ready standby, if its mirror holds the workspace as of later than the snapshot."""
    standby = active_standby(instance.pk, ready=True)
    if standby is None or standby.last_sync_at is None:
        return None
    if snapshot is not None and snapshot_point(snapshot) >= standby.last_sync_at:
        return None
    return standby


def recovery_point(snapshot: Snapshot | None, lost_event: InstanceEvent | None, *,
                   mirror: StandbyMachine | None = None) -> dict:
    """What the recovery brought back (the standby's newer mirror, or the snapshot), and how much work since
    then was lost (up to the last heartbeat)."""
    last_alive = None
    if lost_event is not None:
        last_alive = lost_event.data.get("last_heartbeat_at") or lost_event.data.get("detected_at")
    last_alive_at = datetime.fromisoformat(last_alive) if last_alive else None
    if mirror is not None:
        lost_seconds = max(0.0, (last_alive_at - mirror.last_sync_at).total_seconds()) if last_alive_at else None
        return {
            "message": f"recovery point: the standby's mirror of {mirror.last_sync_at:%Y-%m-%d %H:%M:%S} UTC (newer than "
                       "the latest snapshot)",
            "data": {"recovery_point": mirror.last_sync_at.isoformat(), "snapshot": None, "mirror": mirror.pk,
                     "work_lost_seconds": round(lost_seconds, 1) if lost_seconds is not None else None},
        }
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
