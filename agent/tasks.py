from celery import shared_task

from agent import services


@shared_task(ignore_result=True)
def prune_heartbeats() -> int:
    """Periodic: delete heartbeats older than HEARTBEAT_RETENTION_HOURS, in bounded batches."""
    return services.heartbeats_prune()
