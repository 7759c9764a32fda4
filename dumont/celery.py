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

# Tasks go to a queue by kind, and each queue has its own workers (docker-compose.yml, `make run`):
# hour-long snapshots or three-round races can then never hold every worker while heartbeat flushes and
# the lost-machine and reconcile sweeps wait until their `expires` drops them. Anything not named here
# (destroy, pause, resume, release, standby destroy) goes to DEFAULT_QUEUE.
DEFAULT_QUEUE = "celery"
QUEUE_TASKS = {
    "sweeps": [
        "agent.tasks.flush_heartbeats", "agent.tasks.prune_heartbeats", "instances.tasks.hibernation_sweep",
        "instances.tasks.lost_machine_sweep", "instances.tasks.standby_sweep", "instances.tasks.reconcile",
        "instances.tasks.check_machine", "snapshots.tasks.apply_retention_all",
    ],
    "races": [
        "instances.tasks.launch_race", "instances.tasks.wake_instance", "instances.tasks.recover_instance",
        "instances.tasks.failback_instance",
    ],
    "snapshots": [
        "snapshots.tasks.take_snapshot", "snapshots.tasks.restore_snapshot", "snapshots.tasks.apply_retention",
        "instances.tasks.hibernate_instance", "instances.tasks.record_agent_syncs", "instances.tasks.presync_fastpath",
        "instances.tasks.provision_standby", "instances.tasks.sync_standby", "instances.tasks.failover_instance",
    ],
}
QUEUES = (*QUEUE_TASKS, DEFAULT_QUEUE)
app.conf.task_default_queue = DEFAULT_QUEUE
app.conf.task_routes = {task: {"queue": queue} for queue, tasks in QUEUE_TASKS.items() for task in tasks}


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
