from celery import shared_task
from django.conf import settings

from agent import services

# A flush moves at most AGENT_FLUSH_MAX_BATCHES batches (seconds, not minutes), and must end well before
# its batches count as abandoned and go back to the buffer (AGENT_FLUSH_STALE_SECONDS).
FLUSH_SOFT_TIME_LIMIT = settings.AGENT_FLUSH_STALE_SECONDS // 2
FLUSH_TIME_LIMIT = settings.AGENT_FLUSH_STALE_SECONDS * 3 // 4


@shared_task(ignore_result=True)
def prune_heartbeats() -> int:
    """Periodic: delete heartbeats older than HEARTBEAT_RETENTION_HOURS, in bounded batches."""
    return services.heartbeats_prune()


@shared_task(ignore_result=True, soft_time_limit=FLUSH_SOFT_TIME_LIMIT, time_limit=FLUSH_TIME_LIMIT)
def flush_heartbeats() -> int:
    """Periodic (every AGENT_FLUSH_INTERVAL_SECONDS) and when the buffer is large: Redis -> PostgreSQL."""
    return services.heartbeats_flush()
