"""Reads of the instances app. Every read is scoped to its owner: another user's id is a 404."""

from __future__ import annotations

from django.db.models import Prefetch

from dumont.core.errors import NotFound
from instances.models import Instance, InstanceEvent, StandbyConfig, StandbyMachine


def instances_of(user):
    # the live standby comes along: the API shows its SSH endpoint during a failover
    live = StandbyMachine.objects.filter(status__in=StandbyMachine.ACTIVE)
    return Instance.objects.filter(owner=user).prefetch_related(Prefetch("standbys", queryset=live, to_attr="live_standbys"))


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
