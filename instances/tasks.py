"""Celery tasks of the instances app: thin, take ids only, idempotent (status checks under the
instance's lifecycle lock), time limits below the broker's visibility timeout."""

from celery import shared_task
from django.conf import settings

from instances import agent_setup, hibernation, lifecycle, lost, race, standby
from instances import reconcile as reconcile_module
from instances.models import Instance
from machines.providers.base import RetryableError

# a race lasts at most rounds x batch timeout, plus the creates and destroys around it
RACE_TIME_LIMIT = int(settings.RACE_MAX_ROUNDS * settings.RACE_BATCH_TIMEOUT_SECONDS
                      + settings.RACE_MACHINE_TIMEOUT_SECONDS + 300)
ACTION_TIME_LIMIT = int(settings.MACHINE_ACTION_TIMEOUT_SECONDS + settings.RACE_SSH_TIMEOUT_SECONDS + 120)
RETRYING = {
    "autoretry_for": (lifecycle.Busy, RetryableError),
    "retry_backoff": 2,
    "retry_backoff_max": 120,
    "max_retries": 30,
}


@shared_task(soft_time_limit=RACE_TIME_LIMIT, time_limit=RACE_TIME_LIMIT + 60)
def launch_race(instance_id: int) -> str:
    outcome = race.race_run(instance_id)
    if outcome == "won":
        agent_setup.agent_start(Instance.objects.get(pk=instance_id))
    return outcome


@shared_task(soft_time_limit=ACTION_TIME_LIMIT, time_limit=ACTION_TIME_LIMIT + 60, **RETRYING)
def destroy_instance(instance_id: int) -> str:
    return lifecycle.instance_destroy_run(instance_id)


@shared_task(soft_time_limit=ACTION_TIME_LIMIT, time_limit=ACTION_TIME_LIMIT + 60, **RETRYING)
def pause_instance(instance_id: int) -> str:
    return lifecycle.instance_pause_run(instance_id)


@shared_task(soft_time_limit=ACTION_TIME_LIMIT, time_limit=ACTION_TIME_LIMIT + 60, **RETRYING)
def resume_instance(instance_id: int) -> str:
    return lifecycle.instance_resume_run(instance_id)


# a hibernation snapshots the workspace first, a wake restores it: allow for a big one
SNAPSHOT_TIME_LIMIT = int(settings.SNAPSHOT_TASK_TIME_LIMIT)


@shared_task(soft_time_limit=SNAPSHOT_TIME_LIMIT, time_limit=SNAPSHOT_TIME_LIMIT + 60, **RETRYING)
def hibernate_instance(instance_id: int, reason: str = "idle") -> str:
    return hibernation.instance_hibernate_run(instance_id, reason=reason)


@shared_task(soft_time_limit=ACTION_TIME_LIMIT, time_limit=ACTION_TIME_LIMIT + 60, **RETRYING)
def release_instance(instance_id: int) -> str:
    return hibernation.instance_release_run(instance_id)


@shared_task(soft_time_limit=RACE_TIME_LIMIT + SNAPSHOT_TIME_LIMIT, time_limit=RACE_TIME_LIMIT + SNAPSHOT_TIME_LIMIT + 60,
             **RETRYING)
def wake_instance(instance_id: int) -> str:
    return hibernation.instance_wake_run(instance_id)


@shared_task(soft_time_limit=60, time_limit=90)
def hibernation_sweep() -> dict:
    return hibernation.hibernation_sweep()


@shared_task(soft_time_limit=120, time_limit=150)
def record_agent_syncs() -> list[int]:
    return agent_setup.agent_syncs_record()


@shared_task(soft_time_limit=300, time_limit=360)
def reconcile() -> dict:
    return reconcile_module.reconcile()


# ---- lost machines, recovery, standby ------------------------------------------------------------


@shared_task(soft_time_limit=60, time_limit=90)
def lost_machine_sweep() -> dict:
    return lost.lost_machine_sweep()


@shared_task(soft_time_limit=ACTION_TIME_LIMIT, time_limit=ACTION_TIME_LIMIT + 60)
def check_machine(instance_id: int) -> str:
    return lost.machine_check_run(instance_id)


@shared_task(soft_time_limit=RACE_TIME_LIMIT + SNAPSHOT_TIME_LIMIT, time_limit=RACE_TIME_LIMIT + SNAPSHOT_TIME_LIMIT + 60,
             **RETRYING)
def recover_instance(instance_id: int) -> str:
    return lost.instance_recover_run(instance_id)


@shared_task(soft_time_limit=60, time_limit=90)
def standby_sweep() -> dict:
    return standby.standby_sweep()


STANDBY_TIME_LIMIT = int(settings.STANDBY_BOOT_TIMEOUT_SECONDS + settings.STANDBY_SYNC_TIMEOUT_SECONDS + 300)


@shared_task(soft_time_limit=STANDBY_TIME_LIMIT, time_limit=STANDBY_TIME_LIMIT + 60)
def provision_standby(instance_id: int) -> str:
    return standby.standby_provision_run(instance_id)


@shared_task(soft_time_limit=int(settings.STANDBY_SYNC_TIMEOUT_SECONDS) + 60,
             time_limit=int(settings.STANDBY_SYNC_TIMEOUT_SECONDS) + 120)
def sync_standby(instance_id: int) -> str:
    return standby.standby_sync_run(instance_id)


@shared_task(soft_time_limit=ACTION_TIME_LIMIT, time_limit=ACTION_TIME_LIMIT + 60, **RETRYING)
def destroy_standby(instance_id: int) -> str:
    return standby.standby_destroy_run(instance_id)


@shared_task(soft_time_limit=STANDBY_TIME_LIMIT, time_limit=STANDBY_TIME_LIMIT + 60, **RETRYING)
def failover_instance(instance_id: int) -> str:
    return standby.instance_failover_run(instance_id)


@shared_task(soft_time_limit=RACE_TIME_LIMIT + STANDBY_TIME_LIMIT, time_limit=RACE_TIME_LIMIT + STANDBY_TIME_LIMIT + 60,
             **RETRYING)
def failback_instance(instance_id: int) -> str:
    return standby.instance_failback_run(instance_id)
