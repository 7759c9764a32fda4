"""Reads of the instances app. Every read is scoped to its owner: another user's id is a 404."""

from __future__ import annotations

from dumont.core.errors import NotFound
from instances.models import Instance, InstanceEvent, StandbyConfig


def instances_of(user):
    return Instance.objects.filter(owner=user)


def instance_of(*, user, instance_id: int) -> Instance:
    instance = instances_of(user).filter(pk=instance_id).first()
    if instance is None:
        raise NotFound(f"No instance {instance_id}.")
    return instance


def instance_events(*, instance: Instance, after_id: int | None = None, limit: int = 500):
    events = InstanceEvent.objects.filter(instance=instance)
    if after_id is not None:
        events = events.filter(pk__gt=after_id)
    return events.order_by("id")[:limit]


def standby_config_of(user) -> StandbyConfig:
    """The user's standby settings; defaults (disabled) when never saved."""
    return StandbyConfig.objects.filter(owner=user).first() or StandbyConfig(owner=user)
