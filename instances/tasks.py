"""Celery tasks of the instances app: thin, take ids only, idempotent (status checks under the
instance's lifecycle lock), time limits below the broker's visibility timeout.

The only module that enqueues tasks of this app (besides services.py, for requests): the sweeps and
reconcile return ids and the tasks here fan them out; a step that leads to another (a lost machine to
its recovery or failback) returns its outcome and the task here enqueues what follows."""

from celery import shared_task
from django.conf import settings

from instances import agent_setup, hibernation, lifecycle, lost, race, selectors, standby
from instances import reconcile as reconcile_module
from instances.locks import Busy
from instances.models import Instance, StandbyConfig, UnreachableMachine
from instances.states import Status
from machines.providers.base import RetryableError

# a race lasts at most rounds x batch timeout, plus the creates and destroys around it
RACE_TIME_LIMIT = int(settings.RACE_MAX_ROUNDS * settings.RACE_BATCH_TIMEOUT_SECONDS
                      + settings.RACE_MACHINE_TIMEOUT_SECONDS + 300)
ACTION_TIME_LIMIT = int(settings.MACHINE_ACTION_TIMEOUT_SECONDS + settings.RACE_SSH_TIMEOUT_SECONDS + 120)
RETRYING = {
    "autoretry_for": (Busy, RetryableError),
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
    found = hibernation.hibernation_sweep()
    for instance_id in found.get("hibernating", ()):
        hibernate_instance.delay(instance_id, "idle")
    for instance_id in found.get("releasing", ()):
        release_instance.delay(instance_id)
    return found


@shared_task(soft_time_limit=120, time_limit=150)
def record_agent_syncs() -> list[int]:
    recorded = agent_setup.agent_syncs_record()
    for instance_id in selectors.instances_to_presync(recorded):
        presync_fastpath.apply_async((instance_id,), expires=settings.AGENT_SYNC_RECORD_SECONDS * 5)
    return recorded


@shared_task(soft_time_limit=SNAPSHOT_TIME_LIMIT, time_limit=SNAPSHOT_TIME_LIMIT + 60)
def presync_fastpath(instance_id: int) -> str:
    return hibernation.fastpath_presync_run(instance_id)


@shared_task(soft_time_limit=300, time_limit=360)
def reconcile() -> dict:
    """Destroy unowned machines; re-enqueue the work whose worker died (each task resumes from the database)."""
    found = reconcile_module.reconcile()
    resume = {Status.PENDING: launch_race, Status.LAUNCHING: launch_race, Status.WAKING: wake_instance,
              Status.DESTROYING: destroy_instance, Status.HIBERNATING: hibernate_instance,
              Status.RECOVERING: recover_instance, Status.FAILBACK: failback_instance, Status.PAUSING: pause_instance}
    for instance_id, status in found.pop("resume", []):
        resume[status].delay(instance_id)
    return found


# ---- lost machines, recovery, standby ------------------------------------------------------------


@shared_task(soft_time_limit=60, time_limit=90)
def lost_machine_sweep() -> dict:
    found = lost.lost_machine_sweep()
    for instance_id in found.get("checking", ()):
        check_machine.delay(instance_id)
    for row_id in found.get("rechecking", ()):
        recheck_unreachable.delay(row_id)
    return found


def _after_a_loss(instance_id: int) -> None:
    """What follows a lost machine, a failover or a failback without its standby, once that step has
    committed: the recovery from the latest snapshot, or the automatic failback (auto_recovery)."""
    instance = Instance.objects.get(pk=instance_id)
    if instance.status == Status.RECOVERING:
        recover_instance.delay(instance_id)
    elif instance.status == Status.FAILOVER and StandbyConfig.objects.filter(
            owner_id=instance.owner_id, auto_recovery=True).exists():
        failback_instance.delay(instance_id)


@shared_task(soft_time_limit=ACTION_TIME_LIMIT, time_limit=ACTION_TIME_LIMIT + 60)
def check_machine(instance_id: int) -> str:
    outcome = lost.machine_check_run(instance_id)
    if outcome in ("lost", "unreachable"):  # recovering, or failed over to the standby
        _after_a_loss(instance_id)
    return outcome


# an unreachable machine that answers again is snapshotted before anything else
@shared_task(soft_time_limit=SNAPSHOT_TIME_LIMIT, time_limit=SNAPSHOT_TIME_LIMIT + 60)
def recheck_unreachable(row_id: int) -> str:
    outcome = lost.unreachable_recheck_run(row_id)
    if outcome == "gone":  # the instance's own machine: it is lost now (recovering, or failed over)
        instance_id = UnreachableMachine.objects.get(pk=row_id).instance_id
        _after_a_loss(instance_id)
    return outcome


@shared_task(soft_time_limit=RACE_TIME_LIMIT + SNAPSHOT_TIME_LIMIT, time_limit=RACE_TIME_LIMIT + SNAPSHOT_TIME_LIMIT + 60,
             **RETRYING)
def recover_instance(instance_id: int) -> str:
    return lost.instance_recover_run(instance_id)


@shared_task(soft_time_limit=60, time_limit=90)
def standby_sweep() -> dict:
    found = standby.standby_sweep()
    for name, task in (("provisioning", provision_standby), ("syncing", sync_standby),
                       ("destroying", destroy_standby), ("failing_back", failback_instance)):
        for instance_id in found.get(name, ()):
            task.delay(instance_id)
    return found


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
    outcome = standby.instance_failover_run(instance_id)
    if outcome == "failover":
        _after_a_loss(instance_id)
    return outcome


@shared_task(soft_time_limit=RACE_TIME_LIMIT + STANDBY_TIME_LIMIT, time_limit=RACE_TIME_LIMIT + STANDBY_TIME_LIMIT + 60,
             **RETRYING)
def failback_instance(instance_id: int) -> str:
    outcome = standby.instance_failback_run(instance_id)
    if outcome == "recovering":
        _after_a_loss(instance_id)
    return outcome
