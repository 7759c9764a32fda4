"""CPU standby: a cheap machine that mirrors a GPU instance's workspace, for failover and failback.

- **Provision**: while a GPU instance of a user whose StandbyConfig is enabled is `running`, the standby
  sweep (beat) provisions one CPU machine for it (GCP, or the local marketplace's CPU-only offers). The
  StandbyMachine row is the intent, written before the provider is called; the machine's label
  `<instance label>-s<standby id>` is how reconcile tells it from an orphan. A standby that cannot be
  provisioned is an event (and a `failed` row, retried after STANDBY_RETRY_SECONDS): the GPU instance
  is never touched by it. A `provisioning` row older than STANDBY_BOOT_TIMEOUT_SECONDS whose worker died
  is failed and its machine, found by label, destroyed; the sweep then provisions again.
- **Mirror**: every `sync_interval_seconds` the GPU machine rsyncs its workspace to the standby
  (`rsync -a --delete`: incremental, deletions mirrored), over SSH with a per-standby mirror key whose
  public half only the standby trusts, and the standby's host key pinned (StrictHostKeyChecking=yes).
  Machine to machine: the data never passes through the control plane. `last_sync_at` is when the last
  good sync *started*: the mirror holds the workspace as of then (each file old or new, never torn:
  rsync writes a temporary file and renames it). A machine that never synced with this standby and whose
  workspace was restored from a copy older than the mirror never pushes over it (`mirror_is_newer`).
- **Failover** (a lost or unreachable GPU machine with auto_failover, or `POST /instances/{id}/failover` for
  a drill): `failover`, the instance's SSH endpoint is the standby's; a lost machine is destroyed, an
  unreachable one is kept until its workspace is saved (instances/lost.py). A drill first runs one last
  sync from the (healthy) GPU machine, so it loses nothing; then it destroys that machine. If that sync
  fails, the drill aborts: nothing is destroyed and the instance stays on its GPU.
- **Failback** (automatic with auto_recovery, or `POST /instances/{id}/failback`): `failback`: a race for
  a GPU while the user keeps working on the standby; the standby's workspace is pulled onto the winner
  (a bulk pass, the agent started, then a last delta pass), then `running` on the GPU and the mirror
  resumes. Writes to the standby after the last pass are not carried over (seconds; documented in the
  README). A failback that finds no GPU goes back to `failover` and is retried.
- **Destroy / hibernate**: the standby goes with the instance's machine (hibernation's snapshot is enough).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from dumont.core.locks import advisory_lock, is_locked
from instances.events import instance_event_add
from instances.locks import STANDBY_LOCK, instance_locked
from instances.mirror import PREPARE_STANDBY, StandbyError, mirror
from instances.models import Instance, InstanceEvent, StandbyConfig, StandbyMachine
from instances.relaunch import relaunch
from instances.selectors import active_standby
from instances.states import KEEPS_STANDBY, MACHINE_FIELDS_CLEARED, Status, standby_transition, transition
from machines.clients import ACCOUNTLESS_PROVIDERS, provider_client
from machines.keys import control_plane_key_path, control_plane_public_key
from machines.models import ProviderAccount, SSHKey
from machines.providers.base import STATUS_FAILED, STATUS_GONE, LaunchRequest, ProviderError
from machines.ssh import SSHError, SSHTarget, connect, wait_for_ssh

log = logging.getLogger(__name__)
Kind = InstanceEvent.Kind


# ---- the sweep ----------------------------------------------------------------------------------


def standby_sweep(*, batch_size: int = 500) -> dict:
    """Periodic (beat): which instances want a standby provisioned, a sync, their standby destroyed, an
    automatic failback retried. Returns their ids; the task (instances.tasks.standby_sweep) enqueues the work,
    each re-checked under its own lock, so two sweeps at once do nothing twice."""

    with advisory_lock("standby-sweep", 0) as acquired:
        if not acquired:
            return {"skipped": True}
        now = timezone.now()
        stale = standbys_stale_fail(now=now, batch_size=batch_size)
        enabled_owners = StandbyConfig.objects.filter(enabled=True).values("owner_id")
        retry_after = now - timedelta(seconds=settings.STANDBY_RETRY_SECONDS)
        recently_failed = StandbyMachine.objects.filter(status=StandbyMachine.Status.FAILED,
                                                        created_at__gte=retry_after).values("instance_id")
        wanting = list(
            Instance.objects.filter(status=Status.RUNNING, owner_id__in=enabled_owners)
            .exclude(standbys__status__in=StandbyMachine.ACTIVE).exclude(pk__in=recently_failed)
            .order_by("id").values_list("id", flat=True)[:batch_size]
        )
        due = []
        for standby in (StandbyMachine.objects.filter(status=StandbyMachine.Status.READY,
                                                      instance__status=Status.RUNNING,
                                                      instance__owner__standby_config__isnull=False)
                        .select_related("instance__owner__standby_config").order_by("id")[:batch_size]):
            interval = standby.instance.owner.standby_config.sync_interval_seconds
            if standby.last_sync_at is None or standby.last_sync_at <= now - timedelta(seconds=interval):
                due.append(standby.instance_id)
        unwanted = list(
            StandbyMachine.objects.filter(status__in=StandbyMachine.ACTIVE)
            .filter(~Q(instance__status__in=sorted(KEEPS_STANDBY))
                    | Q(instance__status=Status.RUNNING, instance__owner_id__in=StandbyConfig.objects.filter(
                        enabled=False).values("owner_id")))
            .order_by("id").values_list("instance_id", flat=True)[:batch_size]
        )
        failing_back = list(
            Instance.objects.filter(status=Status.FAILOVER, owner__standby_config__auto_recovery=True,
                                    status_changed_at__lte=retry_after)
            .order_by("id").values_list("id", flat=True)[:batch_size]
        )
        return {"provisioning": wanting, "syncing": due, "destroying": unwanted, "failing_back": failing_back,
                "stale": stale}


def standbys_stale_fail(*, now, batch_size: int = 500) -> list[int]:
    """Provisioning rows older than STANDBY_BOOT_TIMEOUT_SECONDS whose worker is gone (nobody holds their
    lock): failed, and their machine, found by its label, destroyed. The sweep then provisions again."""
    failed = []
    cutoff = now - timedelta(seconds=settings.STANDBY_BOOT_TIMEOUT_SECONDS)
    for standby in (StandbyMachine.objects.filter(status=StandbyMachine.Status.PROVISIONING, created_at__lt=cutoff)
                    .select_related("instance", "provider_account").order_by("id")[:batch_size]):
        if is_locked(STANDBY_LOCK, standby.instance_id):
            continue  # its provisioning is still at work
        try:
            machines = [m.instance_id for m in _client(standby).list(label_prefix=standby.label)
                        if m.label == standby.label and m.status != STATUS_GONE] if standby.label else []
            for machine_id in {*machines, standby.provider_instance_id} - {""}:
                _client(standby).destroy(machine_id)
        except ProviderError as exc:
            log.warning("stale standby %s: cannot destroy its machine yet (%s)", standby.pk, exc)
            continue
        if standby_transition(standby.pk, StandbyMachine.Status.FAILED, expected=StandbyMachine.Status.PROVISIONING,
                              destroyed_at=timezone.now(),
                              error="provisioning never finished (its worker stopped); its machine was destroyed"):
            failed.append(standby.pk)
            instance_event_add(instance=standby.instance, kind=Kind.STANDBY,
                               message=f"standby provisioning interrupted; its machine(s) {sorted(machines)} destroyed, "
                                       "a new one will be provisioned",
                               data={"standby": standby.pk, "failed": True, "destroyed": sorted(machines)})
    return failed


# ---- provisioning -------------------------------------------------------------------------------


def mirror_keypair() -> tuple[str, str]:
    """A fresh ed25519 key for one standby: (OpenSSH private key text, public key line)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public.decode() + " dumont-standby-mirror"


def _account(config: StandbyConfig) -> ProviderAccount | None:
    if config.provider in ACCOUNTLESS_PROVIDERS:
        return None
    account = ProviderAccount.objects.filter(owner_id=config.owner_id, provider=config.provider).order_by("id").first()
    if account is None:
        raise StandbyError(f"no {config.provider} provider account to rent the standby with")
    return account


def _client(standby: StandbyMachine):
    return provider_client(standby.provider, standby.provider_account)


def standby_provision_run(instance_id: int) -> str:
    """Rent, boot and check the CPU machine, then mirror the workspace to it once. Returns ready / failed / skipped."""
    with advisory_lock(STANDBY_LOCK, instance_id) as acquired:
        if not acquired:
            return "busy"
        instance = Instance.objects.select_related("owner").get(pk=instance_id)
        config = StandbyConfig.objects.filter(owner=instance.owner).first()
        if instance.status != Status.RUNNING or config is None or not config.enabled or active_standby(instance_id):
            return "skipped"
        private, public = mirror_keypair()
        standby = StandbyMachine.objects.create(
            instance=instance, provider=config.provider, zone=config.zone, machine_type=config.machine_type,
            spot=config.spot, mirror_private_key=private, mirror_public_key=public,
        )
        standby.label = f"{instance.label}-s{standby.pk}"
        standby.save(update_fields=["label"])
        instance_event_add(instance=instance, kind=Kind.STANDBY, message=f"provisioning a {config.provider} standby",
                           data={"standby": standby.pk, "zone": config.zone, "machine_type": config.machine_type})
        started = time.monotonic()
        try:
            standby.provider_account = _account(config)
            standby.save(update_fields=["provider_account"])
            _rent(standby, config)
        except (ProviderError, SSHError, StandbyError) as exc:
            _standby_failed(standby, f"the standby could not be provisioned: {exc}")
            return "failed"
        seconds = round(time.monotonic() - started, 1)
        instance_event_add(
            instance=instance, kind=Kind.STANDBY,
            message=f"standby ready on {standby.ssh_host}:{standby.ssh_port} (${standby.price_per_hour}/h) "
                    f"after {seconds:.0f}s",
            data={"standby": standby.pk, "seconds": seconds, "price_per_hour": str(standby.price_per_hour or 0)},
        )
        return _sync_locked(instance_id)


def _rent(standby: StandbyMachine, config: StandbyConfig) -> None:
    client = _client(standby)
    offer = client.standby_offer(zone=config.zone, machine_type=config.machine_type, disk_gb=config.disk_gb,
                                 spot=config.spot)
    owner_keys = SSHKey.objects.filter(owner_id=standby.instance.owner_id).values_list("public_key", flat=True)
    launch = LaunchRequest(label=standby.label, image=settings.STANDBY_IMAGE, disk_gb=config.disk_gb,
                           ssh_public_keys=(control_plane_public_key(), standby.mirror_public_key, *owner_keys),
                           interruptible=config.spot)
    machine = client.create(offer, launch)
    standby.provider_instance_id, standby.price_per_hour = machine.instance_id, offer.price_per_hour
    if not StandbyMachine.objects.filter(pk=standby.pk, status=StandbyMachine.Status.PROVISIONING).update(
            provider_instance_id=machine.instance_id, price_per_hour=offer.price_per_hour):
        client.destroy(machine.instance_id)  # the instance was destroyed meanwhile: nothing to keep
        raise StandbyError("the standby is no longer wanted (its instance was destroyed meanwhile)")
    deadline = time.monotonic() + settings.STANDBY_BOOT_TIMEOUT_SECONDS
    while not machine.ssh_ready:
        if machine.status in (STATUS_FAILED, STATUS_GONE):
            raise StandbyError(f"the provider reports the standby {machine.raw_status or machine.status}")
        if time.monotonic() > deadline:
            raise StandbyError(f"not running after {settings.STANDBY_BOOT_TIMEOUT_SECONDS:.0f}s ({machine.raw_status})")
        time.sleep(settings.RACE_POLL_INTERVAL_SECONDS)
        machine = client.get(machine.instance_id)
    target = SSHTarget(machine.ssh_host, machine.ssh_port, machine.ssh_user or "root", machine.ssh_host_key)
    # the host key is pinned at first contact when the provider does not report it (as in the race)
    with wait_for_ssh(target, control_plane_key_path(), deadline) as session:
        session.run(PREPARE_STANDBY, timeout=600, check=True)
        target = session.target
    standby.ssh_host, standby.ssh_port, standby.ssh_user, standby.ssh_host_key = (
        target.host, target.port, target.user, target.host_key)
    standby.status, standby.ready_at = StandbyMachine.Status.READY, timezone.now()
    if not standby_transition(standby.pk, StandbyMachine.Status.READY, expected=StandbyMachine.Status.PROVISIONING,
                              ssh_host=target.host, ssh_port=target.port, ssh_user=target.user,
                              ssh_host_key=target.host_key, ready_at=standby.ready_at):
        client.destroy(machine.instance_id)
        raise StandbyError("the standby is no longer wanted (its instance was destroyed meanwhile)")


def _standby_failed(standby: StandbyMachine, reason: str) -> None:
    """Record the failure, destroy its machine if one was rented (reconcile retries a failed destroy)."""
    destroyed = _destroy_machine(standby)
    standby_transition(standby.pk, StandbyMachine.Status.FAILED, error=reason[:2000],
                       destroyed_at=timezone.now() if destroyed else None)
    log.warning("standby %s of instance %s: %s", standby.pk, standby.instance_id, reason)
    instance_event_add(instance=standby.instance, kind=Kind.STANDBY, message=reason,
                       data={"standby": standby.pk, "failed": True})


def _destroy_machine(standby: StandbyMachine) -> bool:
    if not standby.provider_instance_id:
        return True
    try:
        _client(standby).destroy(standby.provider_instance_id)
    except ProviderError as exc:
        log.warning("standby %s: destroy failed (%s); reconcile retries", standby.pk, exc)
        return False
    return True


# ---- the mirror's sync -----------------------------------------------------------------------------


def standby_sync_run(instance_id: int) -> str:
    with advisory_lock(STANDBY_LOCK, instance_id) as acquired:
        if not acquired:
            return "busy"  # a sync (or provisioning) of this standby is running
        return _sync_locked(instance_id)


def _sync_locked(instance_id: int) -> str:
    """GPU -> standby, once. A failure is recorded; a standby the provider says is gone is replaced."""
    instance = Instance.objects.get(pk=instance_id)
    standby = active_standby(instance_id, ready=True)
    if instance.status != Status.RUNNING or standby is None:
        return "skipped"
    if mirror_is_newer(instance, standby):
        message = ("standby sync refused: the mirror holds later work than this machine's workspace (restored from "
                   "an older copy); it is never overwritten with an older one")
        if not standby.last_sync_error.startswith("refused"):
            instance_event_add(instance=instance, kind=Kind.STANDBY, message=message,
                               data={"standby": standby.pk, "sync_refused": True})
        StandbyMachine.objects.filter(pk=standby.pk).update(last_sync_error=f"refused: {message}")
        return "refused"
    started_at, started = timezone.now(), time.monotonic()
    try:
        with connect(instance.ssh_target, control_plane_key_path()) as session:
            stats = mirror(session, standby)
    except (SSHError, StandbyError) as exc:
        first_failure = not standby.last_sync_error
        StandbyMachine.objects.filter(pk=standby.pk).update(last_sync_error=str(exc)[:2000])
        if _standby_lost(standby):
            _standby_failed(standby, f"the standby was lost ({exc}); a new one will be provisioned")
        elif first_failure:
            instance_event_add(instance=instance, kind=Kind.STANDBY, message=f"standby sync failed: {exc}",
                               data={"standby": standby.pk, "sync_failed": True})
        return "failed"
    seconds = round(time.monotonic() - started, 3)
    StandbyMachine.objects.filter(pk=standby.pk).update(last_sync_at=started_at, last_sync_seconds=seconds,
                                                        last_sync_error="", syncs=standby.syncs + 1,
                                                        synced_from=instance.provider_instance_id)
    if standby.syncs == 0 or standby.last_sync_error:
        instance_event_add(instance=instance, kind=Kind.STANDBY,
                           message=f"standby mirror in sync ({seconds:.1f}s)",
                           data={"standby": standby.pk, "seconds": seconds, **stats})
    return "synced"


def mirror_is_newer(instance: Instance, standby: StandbyMachine) -> bool:
    """Whether pushing this GPU machine's workspace would overwrite a newer mirror: the machine never synced
    with this standby, and what it was restored from was captured before the mirror's last sync."""
    from snapshots.models import SnapshotRestore

    if standby.last_sync_at is None or standby.synced_from in ("", instance.provider_instance_id):
        return False
    restored = (SnapshotRestore.objects.filter(instance=instance, status=SnapshotRestore.Status.SUCCEEDED,
                                               created_at__gte=instance.machine_started_at or instance.created_at)
                .select_related("snapshot").order_by("-id").first())
    if restored is None:
        return True  # a workspace of unknown age (none restored onto this machine): the mirror stays
    captured = restored.snapshot.captured_at or restored.snapshot.finished_at
    return captured is None or captured < standby.last_sync_at


def _standby_lost(standby: StandbyMachine) -> bool:
    try:
        machine = _client(standby).get(standby.provider_instance_id)
    except ProviderError:
        return False  # cannot tell: keep it, the next sync tries again
    return machine.status in (STATUS_FAILED, STATUS_GONE)


# ---- failover and failback -----------------------------------------------------------------------


def failover_to(instance: Instance, standby: StandbyMachine, *, lost: dict, reason: str, detected_at: datetime,
                last_heartbeat: datetime | None, drill: bool = False) -> None:
    """running -> failover: the standby's SSH endpoint is the instance's. The caller holds the lifecycle lock
    and destroys the GPU machine afterwards (an automatic failback is enqueued by instances.tasks)."""

    now = timezone.now()
    last_alive = last_heartbeat or detected_at
    work_lost = max(0.0, (last_alive - standby.last_sync_at).total_seconds())
    data = {
        "standby": standby.pk, "lost": lost, "drill": drill, "recovery_point": standby.last_sync_at.isoformat(),
        "work_lost_seconds": round(work_lost, 1),
        "detection_seconds": round((detected_at - last_heartbeat).total_seconds(), 1) if last_heartbeat else None,
        "failover_seconds": round((now - detected_at).total_seconds(), 3),
        "ssh": {"host": standby.ssh_host, "port": standby.ssh_port, "user": standby.ssh_user},
    }
    with transaction.atomic():
        transition(instance.pk, Status.FAILOVER, expected={Status.RUNNING, Status.UNREACHABLE},
                   message=f"failover ({reason}): work on the standby {standby.ssh_user}@{standby.ssh_host}:"
                           f"{standby.ssh_port}", data=data, **MACHINE_FIELDS_CLEARED)
        instance_event_add(
            instance=instance, kind=Kind.STANDBY,
            message=f"failed over in {data['failover_seconds']:.1f}s after detection; the mirror holds the workspace "
                    f"as of {standby.last_sync_at:%H:%M:%S} UTC ({work_lost:.0f}s of work lost)",
            data=data,
        )


def instance_failover_run(instance_id: int) -> str:
    """The drill: a last sync from the healthy GPU machine, failover, then that machine is destroyed."""
    with instance_locked(instance_id) as instance, advisory_lock(
            STANDBY_LOCK, instance_id, wait_seconds=settings.STANDBY_SYNC_TIMEOUT_SECONDS) as acquired:
        if instance.status != Status.RUNNING or not acquired:
            return "skipped"
        synced = _sync_locked(instance_id)
        standby = active_standby(instance_id, ready=True)
        if standby is None or standby.last_sync_at is None:
            instance_event_add(instance=instance, kind=Kind.STANDBY, message="failover drill aborted: no standby mirror")
            return "no-standby"
        if synced != "synced":  # an older mirror would lose the work since: the GPU machine stays
            error = StandbyMachine.objects.filter(pk=standby.pk).values_list("last_sync_error", flat=True).first()
            instance_event_add(instance=instance, kind=Kind.STANDBY,
                               message=f"failover drill aborted: the last sync {synced} ({error or 'no detail'}); "
                                       "nothing destroyed, the instance stays on its GPU machine",
                               data={"standby": standby.pk, "drill_aborted": True, "sync": synced})
            return "aborted"
        machine = {"provider_instance_id": instance.provider_instance_id, "host_id": instance.host_id,
                   "price_per_hour": str(instance.price_per_hour or 0)}
        now = timezone.now()
        failover_to(instance, standby, lost=machine, reason="drill, last sync synced", detected_at=now,
                    last_heartbeat=standby.last_sync_at, drill=True)
        try:
            provider_client(instance.provider, instance.provider_account).destroy(machine["provider_instance_id"])
        except ProviderError as exc:  # no longer owned: reconcile destroys it
            instance_event_add(instance=instance, kind=Kind.ERROR, message=f"the GPU machine could not be destroyed yet: {exc}")
        return "failover"


def instance_failback_run(instance_id: int) -> str:
    """failback: race for a GPU, pull the standby's workspace onto it, agent, running; the mirror resumes.
    Without its standby: `recovering` (instances.tasks enqueues the recovery from the latest snapshot)."""
    with instance_locked(instance_id) as instance:
        if instance.status == Status.FAILOVER:  # automatic failback (auto_recovery)
            instance = transition(instance.pk, Status.FAILBACK, expected=Status.FAILOVER,
                                  message="failback started (auto recovery)")
        if instance.status != Status.FAILBACK:
            return "skipped"
        standby = active_standby(instance_id, ready=True)
        if standby is None:  # the standby died while the user worked on it: the latest snapshot is what is left
            transition(instance.pk, Status.RECOVERING, expected=Status.FAILBACK,
                       message="failback: the standby is gone; recovering from the latest snapshot",
                       **MACHINE_FIELDS_CLEARED)
            return "recovering"
        done = relaunch(instance.pk, expected=Status.FAILBACK, avoid_hosts=_lost_hosts(instance), source="mirror",
                        standby=standby, running_message="failed back to {host} in {seconds:.1f}s",
                        failed_message="failback failed: copying the workspace back failed ({error}); "
                                       "still on the standby")
        if done.outcome != "running":
            return done.outcome  # back to failover: the user stays on the standby, the sweep retries
        instance_event_add(instance=instance, kind=Kind.STANDBY,
                           message=f"failback done in {done.timings['total']:.1f}s: the standby's workspace is on "
                                   "the GPU machine; mirroring resumes",
                           data={"timings": done.timings, **done.detail})
        return "running"


def _lost_hosts(instance: Instance) -> tuple[str, ...]:
    """The host the last failover fled from, unless it was a drill: the failback race avoids it."""
    failover = (instance.events.filter(kind=Kind.STATUS, data__to=Status.FAILOVER).order_by("-id")
                .values_list("data", flat=True).first()) or {}
    host = (failover.get("lost") or {}).get("host_id")
    return (host,) if host and not failover.get("drill") else ()


# ---- destroy -----------------------------------------------------------------------------------


def standby_destroy(instance: Instance, *, reason: str) -> int:
    """Destroy the instance's standby machines (and retry those whose destroy failed). Raises ProviderError
    if a provider refuses: the calling task retries."""
    destroyed = 0
    for standby in StandbyMachine.objects.filter(instance=instance, destroyed_at__isnull=True).order_by("id"):
        if standby.provider_instance_id:
            _client(standby).destroy(standby.provider_instance_id)
        now = timezone.now()
        if not standby_transition(standby.pk, StandbyMachine.Status.DESTROYED, destroyed_at=now):
            StandbyMachine.objects.filter(pk=standby.pk).update(destroyed_at=now)  # failed already: it keeps that
        destroyed += 1
        instance_event_add(instance=instance, kind=Kind.STANDBY, message=f"standby destroyed ({reason})",
                           data={"standby": standby.pk})
    return destroyed


def standby_destroy_run(instance_id: int) -> str:
    """The sweep's: destroy a standby its instance no longer wants (left the states that keep one, or disabled)."""
    with advisory_lock(STANDBY_LOCK, instance_id, wait_seconds=30) as acquired:
        if not acquired:
            return "busy"
        instance = Instance.objects.select_related("owner").get(pk=instance_id)
        config = StandbyConfig.objects.filter(owner=instance.owner).first()
        wanted = instance.status in KEEPS_STANDBY and (
            instance.status != Status.RUNNING or (config is not None and config.enabled))
        if wanted:
            return "skipped"
        return "destroyed" if standby_destroy(instance, reason=f"instance {instance.status}") else "skipped"


