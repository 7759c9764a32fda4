"""The Celery app. Settings come from Django's (CELERY_*); the periodic schedule is defined here in
code and django-celery-beat's DatabaseScheduler loads it into its tables at beat start-up, where
operators can see it (and pause an entry) in the admin."""

import os
import warnings

from celery import Celery
from celery.exceptions import SecurityWarning

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dumont.settings")
if os.environ.get("DUMONT_QUIET_LOGGERS"):
    # `make run` as root on a development machine: not worth Celery's 8-line warning at every start
    # (`make run ARGS=--verbose` shows it)
    warnings.filterwarnings("ignore", category=SecurityWarning)

app = Celery("dumont")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


def _periodic(task: str, every: float) -> dict:
    # `expires` = the interval: a backlog of sweeps is dropped, not replayed
    return {"task": task, "schedule": float(every), "options": {"expires": every}}


def _beat_schedule() -> dict:
    from django.conf import settings

    return {
        "record-agent-syncs": _periodic("instances.tasks.record_agent_syncs", settings.AGENT_SYNC_RECORD_SECONDS),
        "snapshot-retention": _periodic("snapshots.tasks.apply_retention_all",
                                        settings.SNAPSHOT_RETENTION_INTERVAL_SECONDS),
        "hibernation-sweep": _periodic("instances.tasks.hibernation_sweep", settings.HIBERNATION_SWEEP_SECONDS),
        "lost-machine-sweep": _periodic("instances.tasks.lost_machine_sweep", settings.LOST_SWEEP_SECONDS),
        "standby-sweep": _periodic("instances.tasks.standby_sweep", settings.STANDBY_SWEEP_SECONDS),
        "reconcile-machines": _periodic("instances.tasks.reconcile", settings.RECONCILE_INTERVAL_SECONDS),
        "prune-heartbeats": _periodic("agent.tasks.prune_heartbeats", settings.HEARTBEAT_PRUNE_INTERVAL_SECONDS),
        "flush-heartbeats": _periodic("agent.tasks.flush_heartbeats", settings.AGENT_FLUSH_INTERVAL_SECONDS),
    }


@app.on_after_configure.connect
def _install_beat_schedule(sender, **kwargs):
    sender.conf.beat_schedule = _beat_schedule()
