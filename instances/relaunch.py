"""Relaunch: an instance without a machine gets one back, with its workspace.

The one sequence behind a wake (`waking`, instances/hibernation.py), the recovery of a lost machine
(`recovering`, instances/lost.py) and a failback (`failback`, instances/standby.py):

    race (unless a resumed task finds it already won) -> workspace (the latest snapshot, or the standby's
    mirror) -> agent -> `running`

Timed the same way for all three: `timings` = {race, restore, agent, total} (a failback adds the mirror's
`last_pass`), in the `running` status event and in the caller's own event. The caller holds the instance's
lifecycle lock. If no machine comes up, the race moves the instance as `race.FAILED_RACE_STATUS` says; if
the workspace cannot be brought back, the new machine is destroyed and the instance goes to the same
status (its snapshot or standby untouched).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Literal

from django.conf import settings
from django.utils import timezone

from dumont.core.locks import advisory_lock
from instances import agent_setup
from instances.events import events_for
from instances.locks import STANDBY_LOCK
from instances.mirror import StandbyError, mirror
from instances.models import Instance, StandbyMachine
from instances.race import FAILED_RACE_STATUS, race_locked
from instances.states import MACHINE_FIELDS_CLEARED, Status, transition
from machines.clients import provider_client
from machines.keys import control_plane_key_path
from machines.ssh import SSHError, connect
from snapshots import services as snapshot_services

Source = Literal["snapshot", "mirror"] | None  # None: nothing to restore, the workspace starts empty


@dataclasses.dataclass
class Relaunched:
    outcome: str  # running, restore-failed, copy-failed, or how the race ended (failed, cancelled, ...)
    timings: dict[str, float]
    detail: dict = dataclasses.field(default_factory=dict)  # the restore row, the mirror's figures


class _NotRestored(Exception):
    pass


def relaunch(instance_id: int, *, expected: str, running_message: str, failed_message: str, prefer_host: str = "",
             avoid_hosts: tuple[str, ...] = (), source: Source = "snapshot", snapshot_id: int | None = None,
             standby: StandbyMachine | None = None) -> Relaunched:
    """`expected` -> running. `running_message` / `failed_message` are formatted with `host`, `seconds` /
    `error`. Running is declared as soon as the agent runs (heartbeats): a new machine's restic key and the
    agent's sync follow within the same task (`timings["sync"]`). `source`: "snapshot" (`snapshot_id`, or the latest verified) or "mirror" (`standby`, pulled
    under the standby lock: a periodic sync cannot start, but one may be finishing). A "mirror" source with a
    `snapshot_id` (a recovery whose mirror is newer than its snapshot) falls back on that snapshot if the
    pull fails."""
    instance = Instance.objects.select_related("provider_account", "owner").get(pk=instance_id)
    began = instance.status_changed_at
    timings: dict[str, float] = {}
    if not instance.provider_instance_id:
        started = time.monotonic()
        outcome = race_locked(instance.pk, prefer_host=prefer_host, avoid_hosts=avoid_hosts)
        timings["race"] = round(time.monotonic() - started, 3)
        if outcome != "won":
            return Relaunched(outcome, timings)
        instance.refresh_from_db()
    detail: dict = {}
    hold = (advisory_lock(STANDBY_LOCK, instance_id, wait_seconds=settings.STANDBY_SYNC_TIMEOUT_SECONDS)
            if source == "mirror" else contextlib.nullcontext())

    def declare_running() -> None:
        timings["total"] = round((timezone.now() - began).total_seconds(), 3)
        transition(instance.pk, Status.RUNNING, expected=expected,
                   message=running_message.format(host=instance.host_id, seconds=timings["total"]),
                   data={"price_per_hour": str(instance.price_per_hour or 0), "gpu_name": instance.gpu_name,
                         "timings": timings})

    with hold:
        pulled = False
        try:
            if source == "mirror":
                try:
                    _from_mirror(instance, standby, timings, detail)
                    pulled = True
                except _NotRestored as exc:
                    if snapshot_id is None:
                        raise
                    detail["mirror_error"] = str(exc)[:500]  # the older copy, rather than nothing
                    _from_snapshot(instance, snapshot_id, timings, detail)
                    _agent(instance, timings, declare_running)
            else:
                if source == "snapshot":
                    _from_snapshot(instance, snapshot_id, timings, detail)
                _agent(instance, timings, declare_running)
        except _NotRestored as exc:
            provider_client(instance.provider, instance.provider_account).destroy(instance.provider_instance_id)
            transition(instance.pk, FAILED_RACE_STATUS[expected], expected=expected,
                       message=failed_message.format(error=exc), **MACHINE_FIELDS_CLEARED)
            return Relaunched("copy-failed" if source == "mirror" else "restore-failed", timings, detail)
        if pulled:
            declare_running()
            # the GPU now holds what the standby held at the last pass: that is the mirror's point, and this
            # machine may push to it (instances.standby.mirror_is_newer)
            StandbyMachine.objects.filter(pk=standby.pk).update(last_sync_at=detail.pop("last_pass_at"),
                                                                last_sync_error="", syncs=standby.syncs + 1,
                                                                synced_from=instance.provider_instance_id)
    return Relaunched("running", timings, detail)


def _agent(instance: Instance, timings: dict[str, float], on_heartbeats=None) -> None:
    """The agent; `on_heartbeats` (declare the instance running) as soon as it runs: its sync may follow
    (a new machine's restic key), timed apart as `sync` (~0 when the key was there already)."""
    started = time.monotonic()

    def heartbeats() -> None:
        timings["agent"] = round(time.monotonic() - started, 3)
        if on_heartbeats is not None:
            on_heartbeats()

    agent_setup.agent_start(instance, on_heartbeats=heartbeats)
    timings["sync"] = round(time.monotonic() - started - timings["agent"], 3)


def _from_snapshot(instance: Instance, snapshot_id: int | None, timings: dict[str, float], detail: dict) -> None:
    started = time.monotonic()
    restore = snapshot_services.snapshot_restore(owner=instance.owner, instance_id=instance.pk, snapshot_id=snapshot_id,
                                                 target=instance.ssh_target, on_event=events_for(instance))
    timings["restore"] = round(time.monotonic() - started, 3)
    detail["restore"] = restore.pk
    # what a wake reports: how the workspace came back, how much, how fast
    detail.update(restore_method=restore.method, restore_bytes=restore.stats.get("bytes"),
                  restore_mb_per_second=restore.stats.get("mb_per_second"))
    if restore.status != restore.Status.SUCCEEDED:
        raise _NotRestored(restore.error)


def _from_mirror(instance: Instance, standby: StandbyMachine, timings: dict[str, float], detail: dict) -> None:
    """A bulk pull, the agent, then a last pass for what was written on the standby meanwhile."""
    try:
        with connect(instance.ssh_target, control_plane_key_path()) as session:
            started = time.monotonic()
            detail.update(mirror(session, standby, pull=True))
            timings["restore"] = round(time.monotonic() - started, 3)
            _agent(instance, timings)
            started, detail["last_pass_at"] = time.monotonic(), timezone.now()
            mirror(session, standby, pull=True)
            timings["last_pass"] = round(time.monotonic() - started, 3)
    except (SSHError, StandbyError) as exc:
        raise _NotRestored(str(exc)) from exc
