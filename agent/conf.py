"""Django's settings for the heartbeat hot path, read once: each `django.conf.settings.X` goes through
LazySettings' Python-level `__getattribute__`, and a heartbeat reads some thirty of them.

`from agent.conf import settings` reads like Django's; a test's override_settings (or pytest-django's
`settings` fixture) sends `setting_changed`, which empties the snapshot.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings as django_settings
from django.core.signals import setting_changed


class _Snapshot:
    def __getattr__(self, name: str) -> Any:  # only for a name not read yet
        value = getattr(django_settings, name)
        self.__dict__[name] = value
        return value


settings = _Snapshot()


def _forget(**kwargs: Any) -> None:
    settings.__dict__.clear()


setting_changed.connect(_forget, dispatch_uid="agent.conf.forget")
