"""Start DumontAgent on an instance's machine (after its race, after a wake's restore)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from django.conf import settings

from agent.deploy import SyncConfig, agent_deploy
from agent.services import agent_credential_issue
from dumont.core.locks import advisory_lock
from dumont.core.loops import each_on_its_own
from instances.events import instance_event_add
from instances.locks import LOCK_NAMESPACE
from instances.models import Instance, InstanceEvent
from instances.states import Status
from machines.keys import control_plane_key_path
from machines.ssh import SSHError, SSHTarget, connect
from snapshots import restic
from snapshots import selectors as snapshot_selectors
from snapshots import services as snapshot_services
from snapshots.restic import ResticError
from snapshots.storage import StorageError

log = logging.getLogger(__name__)


def agent_start(instance: Instance, *, on_heartbeats: Callable[[], None] | None = None) -> bool:
    """Deploy the agent with a fresh credential (the previous machine's secret dies with it) and its
    periodic sync (an incremental restic backup every AGENT_SYNC_INTERVAL_SECONDS, restic installed first).

    `on_heartbeats` is called once, as soon as the agent runs: before its sync is set up when that still
    needs the machine's own restic key (`restic key add`, seconds), so a relaunch can declare the instance
    running without waiting for it (a fast-path restore makes no restic key; restic's restore did).

    A failure is an event, not an error: without heartbeats the instance is never judged idle (a
    missing heartbeat is not idleness), so it keeps running, and the agent can be redeployed.
    """
    secret = agent_credential_issue(instance.pk)
    target = instance.ssh_target
    announced = False

    def announce() -> None:
        nonlocal announced
        if on_heartbeats is not None and not announced:
            announced = True
            on_heartbeats()

    def deploy(sync: SyncConfig | None) -> None:
        agent_deploy(target=target, private_key=control_plane_key_path(), instance_id=instance.pk, secret=secret,
                     control_plane_url=settings.AGENT_CONTROL_PLANE_URL, sync=sync)

    try:
        if settings.AGENT_SYNC_ENABLED and not snapshot_selectors.machine_key_ready(instance_id=instance.pk,
                                                                                    target=target):
            # a new machine's own restic key takes seconds to make (`restic key add`, two KDFs): the agent
            # starts its heartbeats first, and is redeployed with its sync once the key is there
            deploy(None)
            announce()
        try:
            sync = _sync(instance, target)
        except (SSHError, ResticError, StorageError, snapshot_services.MachineGone) as exc:
            # heartbeats matter more than the sync: start the agent without it, and say so
            sync = None
            instance_event_add(instance=instance, kind=InstanceEvent.Kind.AGENT,
                               message=f"agent sync not configured: {exc}", data={"error": str(exc)[:500]})
        deploy(sync)
    except SSHError as exc:
        log.warning("agent deploy on instance %s failed: %s", instance.pk, exc)
        instance_event_add(instance=instance, kind=InstanceEvent.Kind.AGENT,
                           message=f"agent could not be started: {exc}", data={"error": str(exc)[:500]})
        announce()
        return False
    announce()
    instance_event_add(instance=instance, kind=InstanceEvent.Kind.AGENT,
                       message="agent started" + (" with its periodic sync" if sync else ""))
    return True


def _sync(instance: Instance, target: SSHTarget) -> SyncConfig | None:
    if not settings.AGENT_SYNC_ENABLED:
        return None
    with connect(target, control_plane_key_path()) as session:
        restic.restic_ensure(session, local_binary=snapshot_services.restic_binary())
    command, env, expires_at = snapshot_services.sync_config(owner=instance.owner, instance_id=instance.pk,
                                                             target=target)
    return SyncConfig(command=command, env=env, env_expires_at=expires_at)


def agent_syncs_record(*, batch_size: int = 500) -> list[int]:
    """Periodic: record each running instance's latest agent sync as a verified periodic snapshot. The
    report comes from the tenant's machine: one instance's bad report is logged and skipped."""
    recorded = []
    for instance_id in Instance.objects.filter(status=Status.RUNNING).order_by("id").values_list("id", flat=True)[
            :batch_size]:
        # under the lifecycle lock, still running: a sync reported by a machine that is being hibernated or
        # replaced meanwhile is never recorded after (and sorted above) that hibernation's snapshot
        with each_on_its_own("recording the agent sync", f"instance {instance_id}"), \
                advisory_lock(LOCK_NAMESPACE, instance_id) as acquired:
            if not acquired:
                continue  # a lifecycle task has it: the next round records the sync
            instance = Instance.objects.select_related("owner").get(pk=instance_id)
            if instance.status != Status.RUNNING:
                continue
            snapshot = _agent_sync_record(instance)
            if snapshot is not None:
                recorded.append(snapshot.pk)
    return recorded


def _agent_sync_record(instance: Instance):
    from agent import selectors as agent_selectors

    latest = agent_selectors.latest_heartbeat(instance.pk)
    last = ((latest or {}).get("sync") or {}).get("last") or {}
    if not isinstance(last, dict):
        log.warning("instance %s reports a sync that is not an object", instance.pk)
        return None
    try:
        snapshot = snapshot_services.snapshot_record_periodic(owner=instance.owner, instance_id=instance.pk,
                                                              report=last)
    except (ResticError, StorageError) as exc:
        log.warning("cannot verify the agent sync of instance %s: %s", instance.pk, exc)
        return None
    if snapshot is not None:
        instance_event_add(instance=instance, kind=InstanceEvent.Kind.SNAPSHOT,
                           message=f"periodic sync {snapshot.restic_snapshot_id[:8]}: {snapshot.status}",
                           data={"snapshot": snapshot.pk, "status": snapshot.status})
    return snapshot
