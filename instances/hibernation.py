"""Auto-hibernation, release and wake.

- **Idle**: every heartbeat of the last IDLE_WINDOW_SECONDS says GPU < IDLE_GPU_THRESHOLD_PERCENT, *and*
  heartbeats came throughout the window (no gap over HEARTBEAT_MAX_GAP_SECONDS, none missing at either
  end). Missing heartbeats are never idleness; a single sample at or above the threshold resets the clock;
  keep-awake-until suspends it. (The reads: instances.selectors.instances_idle / instances_to_release.)
- **Hibernate** = the agent told to prepare (`hibernating`: it starts no new sync and answers
  `hibernate_ready` once none runs) -> the final incremental snapshot, taken after that answer (without
  one within HIBERNATE_AGENT_READY_SECONDS: two passes, the second catching what the first missed) ->
  verified by the control plane (listed in the repository, and a `restic check --read-data-subset`
  sample read back) -> destroy the machine -> `hibernated`. An empty workspace is a valid, empty
  snapshot. If the snapshot fails, the machine is not touched, the instance goes back to `running` and
  the next try waits (backoff); after HIBERNATE_ALERT_AFTER_FAILURES failures in a row, an operator
  alert, and the user's status reason says why and what the idle machine has cost since. The
  destroy happens only after a verified hibernation snapshot of this hibernation exists, so a worker killed
  at any point never leaves a destroyed machine without one: the resumed task finds the snapshot (or takes
  it again) first.
- **Release**: after HIBERNATION_RELEASE_SECONDS hibernated, any provider resource left under the instance's
  label is destroyed and the repository keeps only the latest verified snapshot of the instance.
- **Wake**: a launch race (preferring the last host), then the latest verified snapshot restored onto the
  winner, then the agent; `running` when the workspace is back (instances/relaunch.py). Every step is
  timed in a `wake` event.
"""

from __future__ import annotations

import logging
import time

from django.conf import settings
from django.utils import timezone

from dumont.core.locks import advisory_lock
from instances.events import events_for, instance_event_add, operator_alert, operator_alert_resolve
from instances.locks import instance_locked
from instances.models import Instance, InstanceEvent, OperatorAlert
from instances.relaunch import relaunch
from instances.selectors import instances_idle, instances_to_release
from instances.states import MACHINE_FIELDS_CLEARED, Status, transition
from machines.clients import provider_client
from machines.providers.base import ProviderError
from snapshots import services as snapshot_services
from snapshots.models import Snapshot

log = logging.getLogger(__name__)


# ---- idleness ------------------------------------------------------------------------------


def hibernation_sweep(*, batch_size: int = 500) -> dict:
    """Periodic (beat): the idle instances to hibernate and the long-hibernated ones to release. Returns
    their ids; the task (instances.tasks.hibernation_sweep) enqueues the work. Bounded; two beats at once do
    nothing twice (an advisory lock, and each task re-checks under the instance's lock)."""
    with advisory_lock("hibernation-sweep", 0) as acquired:
        if not acquired:
            return {"skipped": True}
        return {"hibernating": instances_idle(batch_size=batch_size),
                "releasing": instances_to_release(batch_size=batch_size)}


# ---- hibernate -----------------------------------------------------------------------------


def _hibernation_snapshot(instance: Instance) -> Snapshot:
    """The verified snapshot of *this* hibernation: found (a resumed task), resumed, or taken now: after
    the agent answered `hibernate_ready`, or in two passes when it does not answer in time."""
    ours = Snapshot.objects.filter(instance=instance, reason=Snapshot.Reason.HIBERNATE,
                                   created_at__gte=instance.status_changed_at)
    verified = ours.filter(status=Snapshot.Status.VERIFIED).order_by("-id").first()
    if verified:
        return verified
    on_event = events_for(instance)
    unfinished = Snapshot.objects.filter(instance=instance, status__in=Snapshot.ACTIVE).order_by("-id").first()
    if unfinished:  # its worker died mid-backup: run it again
        return snapshot_services.snapshot_run(snapshot_id=unfinished.pk, on_event=on_event, read_back=True)
    ready = _agent_ready(instance)
    instance_event_add(instance=instance, kind=InstanceEvent.Kind.HIBERNATE,
                       message="the agent is ready (no sync running): the final pass" if ready else
                       "the agent did not answer hibernate_ready in time: two passes",
                       data={"agent_ready": ready})
    if not ready:  # a sync may still be writing, or the agent is gone: the second pass catches the rest
        first = snapshot_services.snapshot_take(owner=instance.owner, instance_id=instance.pk,
                                                target=instance.ssh_target, reason=Snapshot.Reason.PERIODIC,
                                                on_event=on_event)
        if first.status != Snapshot.Status.VERIFIED:
            return first
    return snapshot_services.snapshot_take(owner=instance.owner, instance_id=instance.pk, target=instance.ssh_target,
                                           reason=Snapshot.Reason.HIBERNATE, on_event=on_event, read_back=True)


def _agent_ready(instance: Instance) -> bool:
    """Wait (bounded) for a heartbeat saying `hibernate_ready`, sent after this hibernation began."""
    from agent import selectors as agent_selectors

    deadline = time.monotonic() + settings.HIBERNATE_AGENT_READY_SECONDS
    while True:
        latest = agent_selectors.latest_heartbeat(instance.pk)
        if latest and latest["agent_state"] == "hibernate_ready" and latest["received_at"] >= instance.status_changed_at:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)


def hibernation_failure_reason(instance: Instance, snapshot: Snapshot) -> str:
    """The reason the user sees; after HIBERNATE_ALERT_AFTER_FAILURES failures in a row, with what the idle
    machine has cost since the first of them, and an operator alert."""
    streak = []
    for event in instance.events.filter(kind=InstanceEvent.Kind.HIBERNATE).order_by("-id")[:100]:
        if event.data.get("failed"):
            streak.append(event)
        elif event.message == "hibernated":
            break
    if len(streak) < settings.HIBERNATE_ALERT_AFTER_FAILURES:
        return f"hibernation aborted: the snapshot failed ({snapshot.error})"
    since = streak[-1].created_at
    price = instance.price_per_hour or 0
    cost = float(price) * (timezone.now() - since).total_seconds() / 3600
    message = (f"hibernation keeps failing ({len(streak)} times in a row since {since:%Y-%m-%d %H:%M} UTC; last: "
               f"{snapshot.error}); the idle machine keeps running at ${price}/h: ${cost:.2f} since the first failure")
    operator_alert(kind=OperatorAlert.Kind.HIBERNATION_FAILING, key=f"hibernation:{instance.pk}",
                   message=f"instance {instance.pk}: {message}", instance=instance,
                   data={"failures": len(streak), "since": since.isoformat(), "cost_usd": round(cost, 4),
                         "price_per_hour": str(price), "error": snapshot.error[:500]})
    return message


def instance_hibernate_run(instance_id: int, *, reason: str = "idle") -> str:
    with instance_locked(instance_id) as instance:
        if instance.status == Status.RUNNING:
            instance = transition(instance.pk, Status.HIBERNATING, expected=Status.RUNNING,
                                  message=f"hibernating ({reason})", data={"reason": reason})
        elif instance.status != Status.HIBERNATING:
            return "skipped"
        started = time.monotonic()
        snapshot = _hibernation_snapshot(instance)
        if snapshot.status != Snapshot.Status.VERIFIED:
            instance_event_add(instance=instance, kind=InstanceEvent.Kind.HIBERNATE,
                               message=f"hibernation aborted, the machine keeps running: {snapshot.error}",
                               data={"failed": True, "snapshot": snapshot.pk})
            transition(instance.pk, Status.RUNNING, expected=Status.HIBERNATING,
                       message=hibernation_failure_reason(instance, snapshot),
                       data={"price_per_hour": str(instance.price_per_hour or 0), "gpu_name": instance.gpu_name})
            return "snapshot-failed"
        operator_alert_resolve(key=f"hibernation:{instance.pk}")
        # only now, with a verified snapshot, may the machine go
        provider = provider_client(instance.provider, instance.provider_account)
        provider.destroy(instance.provider_instance_id)
        seconds = round(time.monotonic() - started, 3)
        transition(
            instance.pk, Status.HIBERNATED, expected=Status.HIBERNATING,
            message=f"hibernated: snapshot {snapshot.restic_snapshot_id[:8] or '(empty workspace)'} verified, "
                    "machine destroyed",
            data={"price_per_hour": str(instance.price_per_hour or 0), "gpu_name": instance.gpu_name,
                  "host_id": instance.host_id, "snapshot": snapshot.pk, "seconds": seconds},
            **MACHINE_FIELDS_CLEARED,
        )
        instance_event_add(instance=instance, kind=InstanceEvent.Kind.HIBERNATE, message="hibernated",
                           data={"snapshot": snapshot.pk, "seconds": seconds})
        _standby_destroy(instance)
        return "hibernated"


def _standby_destroy(instance: Instance) -> None:
    """The snapshot is enough: the standby goes too. A refusal is retried by the standby sweep."""
    from instances.standby import standby_destroy

    try:
        standby_destroy(instance, reason="instance hibernated")
    except ProviderError as exc:
        instance_event_add(instance=instance, kind=InstanceEvent.Kind.ERROR,
                           message=f"the standby could not be destroyed yet: {exc}")


def instance_release_run(instance_id: int) -> str:
    with instance_locked(instance_id) as instance:
        if instance.status != Status.HIBERNATED or instance.released_at:
            return "skipped"
        provider = provider_client(instance.provider, instance.provider_account)
        leftovers = [m.instance_id for m in provider.list(label_prefix=f"{instance.label}-")]
        for machine_id in leftovers:
            provider.destroy(machine_id)
        forgotten = snapshot_services.snapshots_keep_latest(owner=instance.owner, instance_id=instance.pk)
        Instance.objects.filter(pk=instance.pk).update(released_at=timezone.now())
        instance_event_add(
            instance=instance, kind=InstanceEvent.Kind.HIBERNATE,
            message=f"reservation released: {len(leftovers)} machine(s) destroyed, {forgotten} older snapshot(s) "
                    "forgotten; only the latest verified snapshot remains",
            data={"destroyed": leftovers, "forgotten": forgotten},
        )
        return "released"


# ---- the fast path's presync -------------------------------------------------------------------


def fastpath_presync_run(instance_id: int) -> str:
    """After a periodic sync of a running instance: its fast path brought up to date
    (snapshots.services.fastpath_presync). Not under the lifecycle lock: a machine that stops answering
    mid-presync must not hold up its failover or hibernation (which waits a minute for a presync, then
    takes its snapshot without a fast path)."""
    instance = Instance.objects.select_related("owner").get(pk=instance_id)
    if instance.status != Status.RUNNING or not instance.provider_instance_id:
        return "skipped"
    manifest = snapshot_services.fastpath_presync(owner=instance.owner, instance_id=instance.pk,
                                                  target=instance.ssh_target)
    return manifest.status if manifest is not None else "skipped"


# ---- wake ----------------------------------------------------------------------------------


def instance_wake_run(instance_id: int) -> str:
    with instance_locked(instance_id) as instance:
        if instance.status != Status.WAKING:
            return "skipped"
        done = relaunch(instance.pk, expected=Status.WAKING, prefer_host=_last_host(instance), source="snapshot",
                        running_message="awake on {host} in {seconds:.1f}s",
                        failed_message="wake failed, back to hibernated (snapshot intact): restore failed: {error}")
        if done.outcome == "running":
            detail = done.detail
            restored = (f"{(detail.get('restore_bytes') or 0) / 1e6:.0f} MB restored with "
                        f"{'the fast path' if detail.get('restore_method') == 'fastpath' else 'restic'} at "
                        f"{detail.get('restore_mb_per_second') or 0:.0f} MB/s" if detail.get("restore_method")
                        else "an empty workspace")
            instance_event_add(instance=instance, kind=InstanceEvent.Kind.WAKE,
                               message=f"workspace restored and agent running in {done.timings['total']:.1f}s "
                                       f"({restored})",
                               data={"timings": done.timings, **detail})
        # otherwise the race or the relaunch already sent the instance back to hibernated (or it was destroyed)
        return done.outcome


def _last_host(instance: Instance) -> str:
    event = instance.events.filter(kind=InstanceEvent.Kind.STATUS, data__to=Status.HIBERNATED).order_by("-id").first()
    return (event.data.get("host_id") or "") if event else ""
