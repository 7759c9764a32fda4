"""Celery tasks of the instances app: thin, take ids only, idempotent (status checks under the
instance's lifecycle lock), time limits below the broker's visibility timeout."""

from celery import shared_task
from django.conf import settings

from instances import lifecycle, race
from instances import reconcile as reconcile_module
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
    return race.race_run(instance_id)


@shared_task(soft_time_limit=ACTION_TIME_LIMIT, time_limit=ACTION_TIME_LIMIT + 60, **RETRYING)
def destroy_instance(instance_id: int) -> str:
    return lifecycle.instance_destroy_run(instance_id)


@shared_task(soft_time_limit=ACTION_TIME_LIMIT, time_limit=ACTION_TIME_LIMIT + 60, **RETRYING)
def pause_instance(instance_id: int) -> str:
    return lifecycle.instance_pause_run(instance_id)


@shared_task(soft_time_limit=ACTION_TIME_LIMIT, time_limit=ACTION_TIME_LIMIT + 60, **RETRYING)
def resume_instance(instance_id: int) -> str:
    return lifecycle.instance_resume_run(instance_id)


@shared_task(soft_time_limit=300, time_limit=360)
def reconcile() -> dict:
    return reconcile_module.reconcile()
