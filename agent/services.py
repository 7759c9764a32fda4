"""Writes of the agent app: credentials, heartbeat ingestion (into Redis), flushing (into PostgreSQL),
pruning.

Why heartbeats go through Redis: one INSERT per request caps the API near 1,600 heartbeats/s; a
Redis list flushed in batches of ~1,000 rows sustains several times that at millisecond latencies.
The cost is that a Redis crash loses the heartbeats not yet flushed (at most a few seconds of them).
That must never read as idleness, and does not: idleness needs readings *throughout* the window
(see selectors.heartbeats_window), so lost heartbeats are a gap, and a gap is never idle.
"""

from __future__ import annotations

import functools
import json
import logging
import secrets
from datetime import timedelta
from typing import Any

import psycopg
from django.db import DataError, IntegrityError, connection, transaction
from django.utils import timezone

from agent import buffer
from agent.auth import Agent, AuthFailed
from agent.conf import settings
from agent.models import AgentCredential, Heartbeat
from dumont.core.errors import NotAuthenticated, ServiceUnavailable
from instances.choices import Status
from instances.models import Instance

log = logging.getLogger(__name__)

ACTION_NONE = "none"
ACTION_PREPARE_HIBERNATE = "prepare_hibernate"
ACTION_SHUTDOWN = "shutdown"
# No machine should be running for these: an agent that still heartbeats stops itself.
_SHUTDOWN_STATUSES = frozenset({Status.DESTROYING, Status.DESTROYED, Status.HIBERNATED, Status.FAILED})


class Replay(NotAuthenticated):
    """The nonce was already used within the signature window (answered like any failed authentication)."""


def agent_credential_issue(instance_id: int) -> str:
    """Create the instance's agent secret, or rotate it. Returns the plain secret, only to the caller
    that deploys it: it is stored encrypted and never shown again (no API, no admin, no log)."""
    secret = secrets.token_urlsafe(32)
    credential, created = AgentCredential.objects.get_or_create(instance_id=instance_id, defaults={"secret": secret})
    if not created:
        credential.secret = secret
        credential.rotated_at = timezone.now()
        credential.save(update_fields=["secret", "rotated_at"])
    return secret


def agent_credential_revoke(instance_id: int) -> bool:
    """The instance's machine went (destroyed, hibernated, replaced): its agent's secret stops working now,
    for heartbeats and for storage keys alike (the next machine's agent gets a new one from agent_start).
    Returns whether there was one."""
    # a queryset delete sends post_delete per row: agent.mirror forgets the secret at once
    return AgentCredential.objects.filter(instance_id=instance_id).delete()[0] > 0


def action_for_status(status: str) -> str:
    if status in _SHUTDOWN_STATUSES:
        return ACTION_SHUTDOWN
    if status == Status.HIBERNATING:
        return ACTION_PREPARE_HIBERNATE
    return ACTION_NONE


class Unavailable(ServiceUnavailable):
    """Storage could not issue keys now: the agent tries again later."""


def sync_credentials_issue(*, agent: Agent) -> dict[str, Any]:
    """New storage keys for an agent's sync (see agent.api.views.sync_credentials). Raises Replay for a
    nonce seen before, AuthFailed for an instance that no longer holds a machine."""
    from instances.choices import HOLDS_MACHINE
    from instances.models import Instance
    from snapshots import services as snapshot_services
    from snapshots.storage import StorageError

    nonce_ttl = settings.AGENT_SIGNATURE_MAX_AGE_SECONDS + settings.AGENT_CLOCK_SKEW_SECONDS + 1
    if not buffer.call("SET", buffer.key("nonce", agent.instance_id, agent.nonce), 1, "NX", "EX", nonce_ttl):
        raise Replay
    instance = Instance.objects.select_related("owner").filter(pk=agent.instance_id,
                                                               status__in=sorted(HOLDS_MACHINE)).first()
    if instance is None:
        raise AuthFailed
    try:
        credentials, expires_at = snapshot_services.sync_credentials(owner=instance.owner, instance_id=instance.pk,
                                                                     target=instance.ssh_target)
    except snapshot_services.MachineGone:
        raise AuthFailed from None  # not this instance's current machine
    except StorageError as exc:
        log.warning("no sync credentials for instance %s: %s", instance.pk, exc)
        raise Unavailable from exc
    return {"env": credentials.aws_env(), "expires_at": expires_at}


def heartbeat_record(*, agent: Agent, heartbeat: dict[str, Any], received_at: float) -> dict[str, Any]:
    """Buffer an authenticated, validated heartbeat and answer what the agent should do.

    Raises Replay (nothing stored) when its nonce was seen before.
    """
    record = {
        "i": agent.instance_id,
        "r": received_at,
        "n": agent.nonce,
        "u": heartbeat["gpu_util"],
        "m": {"source": heartbeat["gpu_source"], "gpus": heartbeat["gpus"], "error": heartbeat["gpu_error"],
              "version": heartbeat["agent_version"]},
        "s": heartbeat["sync"],
        "a": heartbeat["state"],
        "t": heartbeat["time"],
    }
    stored, flush_now = buffer.ingest(instance_id=agent.instance_id, nonce=agent.nonce, record=record)
    if not stored:
        raise Replay
    if flush_now:
        from agent.tasks import flush_heartbeats

        flush_heartbeats.apply_async(expires=settings.AGENT_FLUSH_INTERVAL_SECONDS * 5)
    return {"action": action_for_status(agent.instance_status), "interval": settings.AGENT_HEARTBEAT_INTERVAL_SECONDS}


_COLUMNS = "instance_id, received_at, nonce, gpu_util, gpu_metrics, sync, agent_state, agent_time"
# PostgreSQL unpacks the buffered JSON records itself: converting them row by row in Python cost more
# CPU than PostgreSQL's whole share of the insert.
_UNPACK = (
    "(r->>'i')::bigint, to_timestamp((r->>'r')::float8), r->>'n', (r->>'u')::float8, r->'m',"
    " coalesce(nullif(r->'s', 'null'::jsonb), '{}'::jsonb), r->>'a', to_timestamp((r->>'t')::float8)"
)


@functools.cache
def _insert_sql() -> tuple[str, str]:
    heartbeats = Heartbeat._meta.db_table
    instances = Instance._meta.db_table
    return (
        "CREATE TEMP TABLE IF NOT EXISTS heartbeat_batch_json (r jsonb) ON COMMIT DELETE ROWS",
        # the join drops heartbeats of instances deleted meanwhile; the unique nonce, a batch flushed twice
        f"INSERT INTO {heartbeats} ({_COLUMNS}) SELECT {_UNPACK} FROM heartbeat_batch_json b"  # noqa: S608
        f" JOIN {instances} i ON i.id = (b.r->>'i')::bigint ON CONFLICT (nonce) DO NOTHING",
    )


def _insert(records: list[bytes] | list[dict[str, Any]]) -> int:
    """Insert a batch of buffered records (their JSON, or parsed) with one COPY and one INSERT ...
    SELECT (a tenth of what the ORM's bulk_create costs per row). Returns how many rows it added."""
    create, insert = _insert_sql()
    lines = [
        # COPY's text format: JSON has no raw tab or newline, only backslashes need escaping
        (r if isinstance(r, bytes) else json.dumps(r, separators=(",", ":")).encode()).replace(b"\\", b"\\\\")
        for r in records
    ]
    for attempt in range(3):
        try:
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute(create)
                with cursor.copy("COPY heartbeat_batch_json (r) FROM STDIN") as copy:
                    copy.write(b"\n".join(lines) + b"\n")
                cursor.execute(insert)
                return cursor.rowcount
        except IntegrityError:  # an instance was deleted between the join and the commit
            if attempt == 2:
                raise  # not a race: a row of this batch breaks a constraint
    raise AssertionError("unreachable")


def _insert_or_set_aside(records: list[bytes]) -> int:
    """`_insert`, except that a batch PostgreSQL refuses (a row it cannot take: a bad number, bad JSON,
    a missing column) is split in halves until each refused row is alone, and those rows go to the
    dead-letter list with the reason: one poisoned row never holds back everyone's heartbeats.
    Errors that are not the rows' (the database is down) propagate: the batch goes back to the buffer."""
    try:
        return _insert(records)
    except (DataError, IntegrityError, psycopg.DataError, psycopg.IntegrityError) as exc:  # COPY: psycopg's own
        if len(records) > 1:
            half = len(records) // 2
            return _insert_or_set_aside(records[:half]) + _insert_or_set_aside(records[half:])
        reason = f"{type(exc).__name__}: {exc}".strip()[:500]
        log.error("heartbeat set aside (dead-letter list): %s", reason)
        buffer.dead_letter(records[0], reason=reason)
        return 0


def heartbeats_flush(*, batch_size: int | None = None, max_batches: int | None = None) -> int:
    """Move buffered heartbeats into PostgreSQL, in batches. Safe with any number of concurrent
    flushers: each claims its own batch atomically and acknowledges it only after the commit; a
    flusher killed in between leaves its batch to be put back and flushed again (the unique nonce
    makes that idempotent). Returns how many heartbeats it flushed."""
    batch_size = batch_size or settings.AGENT_FLUSH_BATCH_SIZE
    max_batches = max_batches or settings.AGENT_FLUSH_MAX_BATCHES
    returned = buffer.batch_recover_stale(settings.AGENT_FLUSH_STALE_SECONDS)
    if returned:
        log.warning("put back %d heartbeats a dead flusher had taken", returned)
    buffer.flush_request_clear()  # a flush is running: the next size trigger may queue another
    flushed = 0
    for _ in range(max_batches):
        batch = buffer.batch_claim(batch_size)
        if batch is None:
            break
        _insert_or_set_aside(batch.raw)
        batch.ack()
        flushed += len(batch.raw)
    return flushed


def heartbeats_prune(
    *, older_than: timedelta | None = None, batch_size: int | None = None, max_batches: int | None = None
) -> int:
    """Delete old heartbeats in batches (short transactions, no long lock on a big table).

    Stops after `max_batches`: the next periodic run continues, so one run stays bounded.
    Returns how many rows were deleted.
    """
    older_than = older_than or timedelta(hours=settings.HEARTBEAT_RETENTION_HOURS)
    batch_size = batch_size or settings.HEARTBEAT_PRUNE_BATCH_SIZE
    max_batches = max_batches or settings.HEARTBEAT_PRUNE_MAX_BATCHES
    cutoff = timezone.now() - older_than
    deleted = 0
    for _ in range(max_batches):
        ids = list(Heartbeat.objects.filter(received_at__lt=cutoff).order_by("id").values_list("id", flat=True)[:batch_size])
        if not ids:
            break
        deleted += Heartbeat.objects.filter(id__in=ids).delete()[0]
    return deleted
