"""Glue: snapshot and restore events (the `snapshot_event` signal, sent by snapshot tasks in workers)
into the instance's event feed. The instances app subscribes: dependencies point instances -> snapshots."""

from instances.models import Instance
from instances.services import instance_event_add


def record_instance_event(sender, *, instance_id: int, kind: str, message: str, data: dict, **kwargs) -> None:
    instance = Instance.objects.filter(pk=instance_id).first()
    if instance is not None:
        instance_event_add(instance=instance, kind=kind, message=message, data=data)
