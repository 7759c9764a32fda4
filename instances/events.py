"""The instance's event feed (`InstanceEvent`): how every part of the lifecycle writes to it, and the
receiver that turns the snapshots app's `snapshot_event` signal into events (wired in apps.py), so that
dependencies point instances -> snapshots only. And the operators' feed (`OperatorAlert`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from instances.models import Instance, InstanceEvent, OperatorAlert


def instance_event_add(*, instance: Instance, kind: str, message: str, data: dict[str, Any] | None = None) -> InstanceEvent:
    return InstanceEvent.objects.create(instance=instance, kind=kind, message=message, data=data or {})


def events_for(instance: Instance) -> Callable[[str, str, dict], None]:
    """An `on_event` callback for the snapshots services that writes to this instance's feed."""
    def on_event(kind: str, message: str, data: dict) -> None:
        instance_event_add(instance=instance, kind=kind, message=message, data=data)

    return on_event


def record_instance_event(sender, *, instance_id: int, kind: str, message: str, data: dict, **kwargs) -> None:
    """Receiver of `snapshots.signals.snapshot_event` (snapshot tasks in workers)."""
    instance = Instance.objects.filter(pk=instance_id).first()
    if instance is not None:
        instance_event_add(instance=instance, kind=kind, message=message, data=data)


def operator_alert(*, kind: str, key: str, message: str, data: dict[str, Any] | None = None,
                   instance: Instance | None = None) -> OperatorAlert:
    """Record (once while open) something only an operator can judge (listed in the admin)."""
    existing = OperatorAlert.objects.filter(key=key, resolved_at__isnull=True).first()
    if existing is not None:
        return existing
    try:
        with transaction.atomic():
            return OperatorAlert.objects.create(kind=kind, key=key, message=message, data=data or {},
                                                instance=instance)
    except IntegrityError:  # raised at the same moment by a concurrent task
        return OperatorAlert.objects.get(key=key, resolved_at__isnull=True)


def operator_alert_resolve(*, key: str) -> int:
    return OperatorAlert.objects.filter(key=key, resolved_at__isnull=True).update(resolved_at=timezone.now())
