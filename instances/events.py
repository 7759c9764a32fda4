"""The instance's event feed (`InstanceEvent`): how every part of the lifecycle writes to it, and the
receiver that turns the snapshots app's `snapshot_event` signal into events (wired in apps.py), so that
dependencies point instances -> snapshots only."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from instances.models import Instance, InstanceEvent


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
