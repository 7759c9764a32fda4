"""`snapshot_event`: progress and outcome of snapshots and restores, for whoever keeps an event feed.

Sent with `instance_id`, `kind` ("snapshot" or "restore"), `message` and `data` (never a secret).
The instances app turns them into InstanceEvents (instances/events.py, wired in instances/apps.py).
"""

from __future__ import annotations

from typing import Any

from django.dispatch import Signal

snapshot_event = Signal()


def emitter(instance_id: int):
    """An `on_event` callback for the services that sends `snapshot_event` for this instance."""

    def emit(kind: str, message: str, data: dict[str, Any]) -> None:
        snapshot_event.send(sender="snapshots", instance_id=instance_id, kind=kind, message=message, data=data)

    return emit
