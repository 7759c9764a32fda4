"""Writes of the instances app. Status changes go through instances.states.transition only."""

from __future__ import annotations

from typing import Any

from django.db import transaction

from instances.models import Instance, InstanceEvent, StandbyConfig


def instance_event_add(*, instance: Instance, kind: str, message: str, data: dict[str, Any] | None = None) -> InstanceEvent:
    return InstanceEvent.objects.create(instance=instance, kind=kind, message=message, data=data or {})


def standby_config_update(*, owner, **changes: Any) -> StandbyConfig:
    with transaction.atomic():
        config, _ = StandbyConfig.objects.select_for_update().get_or_create(owner=owner)
        for name, value in changes.items():
            setattr(config, name, value)
        config.full_clean()
        config.save()
    return config
