"""Writes of the instances app. Status changes go through instances.states.transition only; the slow
work (provider calls, SSH) runs in Celery tasks enqueued once the request's transaction commits."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from dumont.core.errors import Conflict, InvalidInput, NotFound
from instances.choices import NAME_TAKEN
from instances.events import instance_event_add
from instances.models import Instance, InstanceEvent, StandbyConfig
from instances.selectors import active_standby
from instances.states import Status, can_transition, transition
from machines.clients import ACCOUNTLESS_PROVIDERS, provider_client
from machines.models import ProviderAccount
from machines.providers.base import provider_names
from snapshots import services as snapshot_services
from snapshots.models import Snapshot, SnapshotRestore


def instance_create(
    *,
    owner,
    name: str,
    provider: str = "local",
    provider_account: int | None = None,
    gpu_name: str = "",
    num_gpus: int = 1,
    max_price_per_hour: Decimal | None = None,
    disk_gb: int = 50,
    image: str = "pytorch/pytorch:latest",
    region: str = "",
    interruptible: bool = False,
) -> Instance:
    """Save the instance as pending and start its launch race once the row is committed."""
    from instances import tasks

    if provider not in provider_names():
        raise InvalidInput(f"Unknown provider {provider!r}.", code="invalid_provider")
    account = None
    if provider not in ACCOUNTLESS_PROVIDERS:
        if provider_account is None:
            raise InvalidInput(f"Provider {provider!r} needs `provider_account`.", code="account_required",
                               data={"fields": {"provider_account": ["This field is required for this provider."]}})
        account = ProviderAccount.objects.filter(owner=owner, pk=provider_account).first()
        if account is None:
            raise NotFound(f"No provider account {provider_account}.")
        if account.provider != provider:
            raise InvalidInput(f"Provider account {account.pk} is a {account.provider} account, not {provider}.",
                               code="account_mismatch")
    else:
        provider_client(provider)  # refuses a disabled local marketplace
    if Instance.objects.filter(owner=owner, name=name, status__in=NAME_TAKEN).exists():
        raise Conflict(f"You already have an active instance named {name!r}.")
    try:
        with transaction.atomic():
            instance = Instance.objects.create(
                owner=owner, name=name, provider=provider, provider_account=account, gpu_name=gpu_name,
                num_gpus=num_gpus, max_price_per_hour=max_price_per_hour, disk_gb=disk_gb, image=image,
                region=region, interruptible=interruptible,
            )
            instance_event_add(instance=instance, kind=InstanceEvent.Kind.INFO, message="instance created",
                               data={"provider": provider, "gpu_name": gpu_name, "num_gpus": num_gpus})
            transaction.on_commit(lambda: tasks.launch_race.delay(instance.pk))
    except IntegrityError as exc:  # two creates with the same name at once
        raise Conflict(f"You already have an active instance named {name!r}.") from exc
    return instance


def _require(instance: Instance, target: str, action: str) -> None:
    if not can_transition(instance.status, target):
        raise Conflict(f"Cannot {action} an instance that is {instance.status}.", code="invalid_state",
                       data={"status": instance.status})


def _transition_then(instance: Instance, target: str, task, **transition_args: Any) -> Instance:
    """Move the instance now (so a second request is a 409), and send its task once that has committed."""
    with transaction.atomic():
        instance = transition(instance.pk, target, **transition_args)
        transaction.on_commit(lambda: task.delay(instance.pk))
    return instance


def _expect(instance: Instance, status: str, action: str) -> None:
    if instance.status != status:
        raise Conflict(f"Cannot {action} an instance that is {instance.status}.", code="invalid_state",
                       data={"status": instance.status})


def instance_destroy_request(*, instance: Instance) -> Instance:
    """Mark destroying now (a running race sees it and stops), release the machines in a task."""
    from instances import tasks

    _require(instance, Status.DESTROYING, "destroy")
    return _transition_then(instance, Status.DESTROYING, tasks.destroy_instance, expected=instance.status,
                            message="destroy requested")


def instance_pause_request(*, instance: Instance) -> Instance:
    from instances import tasks

    _require(instance, Status.PAUSED, "pause")
    if not provider_client(instance.provider, instance.provider_account).supports_stop:
        raise Conflict(f"{instance.provider} machines cannot be paused; hibernate instead.", code="unsupported")
    instance_event_add(instance=instance, kind=InstanceEvent.Kind.INFO, message="pause requested")
    transaction.on_commit(lambda: tasks.pause_instance.delay(instance.pk))
    return instance


def instance_resume_request(*, instance: Instance) -> Instance:
    from instances import tasks

    _expect(instance, Status.PAUSED, "resume")
    instance_event_add(instance=instance, kind=InstanceEvent.Kind.INFO, message="resume requested")
    transaction.on_commit(lambda: tasks.resume_instance.delay(instance.pk))
    return instance


def instance_hibernate_request(*, instance: Instance) -> Instance:
    """Hibernate by hand: the same path as auto-hibernation (verified snapshot first)."""
    from instances import tasks

    _require(instance, Status.HIBERNATING, "hibernate")
    instance_event_add(instance=instance, kind=InstanceEvent.Kind.HIBERNATE, message="hibernation requested")
    transaction.on_commit(lambda: tasks.hibernate_instance.delay(instance.pk, "manual"))
    return instance


def instance_wake_request(
    *, instance: Instance, gpu_name: str | None = None, region: str | None = None,
    max_price_per_hour: Decimal | None = None,
) -> Instance:
    """hibernated -> waking at once (so a second wake is a 409), then race + restore in a task.
    The optional overrides change the instance's requested spec for this and later launches."""
    from instances import tasks

    _expect(instance, Status.HIBERNATED, "wake")
    overrides = {name: value for name, value in
                 {"gpu_name": gpu_name, "region": region, "max_price_per_hour": max_price_per_hour}.items()
                 if value is not None}
    return _transition_then(instance, Status.WAKING, tasks.wake_instance, expected=Status.HIBERNATED,
                            message="wake requested", data={k: str(v) for k, v in overrides.items()},
                            released_at=None, **overrides)


def instance_keep_awake(*, instance: Instance, minutes: int) -> Instance:
    """No auto-hibernation for the next `minutes` (0 lifts it)."""
    until = timezone.now() + timedelta(minutes=minutes) if minutes else None
    with transaction.atomic():
        Instance.objects.select_for_update().filter(pk=instance.pk).update(keep_awake_until=until)
        instance_event_add(instance=instance, kind=InstanceEvent.Kind.INFO,
                           message=f"kept awake for {minutes} minutes" if minutes else "keep-awake lifted",
                           data={"until": until.isoformat() if until else None})
    instance.refresh_from_db()
    return instance


def instance_failover_request(*, instance: Instance) -> Instance:
    """A failover drill: 409 unless running with a standby that has mirrored at least once."""
    from instances import tasks

    _expect(instance, Status.RUNNING, "fail over")
    standby = active_standby(instance.pk, ready=True)
    if standby is None or standby.last_sync_at is None:
        raise Conflict("This instance has no standby with a mirror yet; enable standby and wait for its first sync.",
                       code="no_standby")
    instance_event_add(instance=instance, kind=InstanceEvent.Kind.STANDBY, message="failover requested (drill)")
    transaction.on_commit(lambda: tasks.failover_instance.delay(instance.pk))
    return instance


def instance_failback_request(*, instance: Instance) -> Instance:
    """failover -> failback at once (so a second request is a 409), then the race and the copy in a task."""
    from instances import tasks

    _expect(instance, Status.FAILOVER, "fail back")
    return _transition_then(instance, Status.FAILBACK, tasks.failback_instance, expected=Status.FAILOVER,
                            message="failback requested")


def _running(instance: Instance) -> None:
    if instance.status != Status.RUNNING:
        raise Conflict(f"instance {instance.pk} is {instance.status}, not running", data={"status": instance.status})


def instance_snapshot_request(*, instance: Instance, fast: bool = False) -> Snapshot:
    """Snapshot a running instance now (`POST /instances/{id}/snapshots`, with `fast`: its fast path too); a
    snapshots task takes it."""
    from snapshots import tasks as snapshot_tasks

    _running(instance)
    snapshot = snapshot_services.snapshot_create(owner=instance.owner, instance_id=instance.pk,
                                                 target=instance.ssh_target, fast=fast)
    instance_event_add(instance=instance, kind=InstanceEvent.Kind.SNAPSHOT,
                       message=f"snapshot {snapshot.pk} requested", data={"snapshot": snapshot.pk})
    transaction.on_commit(lambda: snapshot_tasks.take_snapshot.delay(snapshot.pk))
    return snapshot


def instance_restore_request(*, instance: Instance, snapshot: Snapshot) -> SnapshotRestore:
    """Restore one of the owner's snapshots into a running instance's workspace (`POST /instances/{id}/restore`;
    files not in the snapshot stay); a snapshots task runs it."""
    from snapshots import tasks as snapshot_tasks

    _running(instance)
    restore = snapshot_services.restore_create(owner=instance.owner, snapshot_id=snapshot.pk, instance_id=instance.pk,
                                               target=instance.ssh_target)
    instance_event_add(instance=instance, kind=InstanceEvent.Kind.RESTORE,
                       message=f"restore of snapshot {snapshot.pk} requested",
                       data={"restore": restore.pk, "snapshot": snapshot.pk})
    transaction.on_commit(lambda: snapshot_tasks.restore_snapshot.delay(restore.pk))
    return restore


def standby_config_update(*, owner, **changes: Any) -> StandbyConfig:
    with transaction.atomic():
        config, _ = StandbyConfig.objects.select_for_update().get_or_create(owner=owner)
        for name, value in changes.items():
            setattr(config, name, value)
        config.full_clean()
        config.save()
    return config
