"""The Celery app. Settings come from Django's (CELERY_*); the periodic schedule is defined here in
code and django-celery-beat's DatabaseScheduler loads it into its tables at beat start-up, where
operators can see it (and pause an entry) in the admin."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dumont.settings")

app = Celery("dumont")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


def _beat_schedule() -> dict:
    from django.conf import settings

    prune_every = settings.HEARTBEAT_PRUNE_INTERVAL_SECONDS
    reconcile_every = settings.RECONCILE_INTERVAL_SECONDS
    flush_every = settings.AGENT_FLUSH_INTERVAL_SECONDS
    sweep_every = settings.HIBERNATION_SWEEP_SECONDS
    retention_every = settings.SNAPSHOT_RETENTION_INTERVAL_SECONDS
    syncs_every = settings.AGENT_SYNC_RECORD_SECONDS
    return {
        "record-agent-syncs": {
            "task": "instances.tasks.record_agent_syncs",
            "schedule": float(syncs_every),
            "options": {"expires": syncs_every},
        },
        "snapshot-retention": {
            "task": "snapshots.tasks.apply_retention_all",
            "schedule": float(retention_every),
            "options": {"expires": retention_every},
        },
        "hibernation-sweep": {
            "task": "instances.tasks.hibernation_sweep",
            "schedule": float(sweep_every),
            "options": {"expires": sweep_every},
        },
        "reconcile-machines": {
            "task": "instances.tasks.reconcile",
            "schedule": float(reconcile_every),
            "options": {"expires": reconcile_every},
        },
        "prune-heartbeats": {
            "task": "agent.tasks.prune_heartbeats",
            "schedule": float(prune_every),
            # a backlog of sweeps is dropped, not replayed
            "options": {"expires": prune_every},
        },
        "flush-heartbeats": {
            "task": "agent.tasks.flush_heartbeats",
            "schedule": float(flush_every),
            "options": {"expires": flush_every},
        },
    }


@app.on_after_configure.connect
def _install_beat_schedule(sender, **kwargs):
    sender.conf.beat_schedule = _beat_schedule()
