"""The credential mirror: each instance's (status, *encrypted* agent secret) in Redis, so that a
heartbeat needs no PostgreSQL query (one Redis GET instead of a query: the query was a third of a
heartbeat's CPU, and PostgreSQL's share of the machine besides).

Keys (under `<REDIS_KEY_PREFIX>:agent-credential:`, apart from agent.buffer's keys):
- `<instance>`      "<status>\\n<ciphertext>", for AGENT_MIRROR_TTL_SECONDS at most. Never the plain secret.
- `gen:<instance>`  a counter, bumped by every invalidation.

Kept current by invalidation (agent.apps wires the receivers): saving an AgentCredential (issue,
rotation) or an Instance's status, or deleting either, deletes the entry at once (so the rest of that
transaction reads PostgreSQL) and again right after the commit. The next heartbeat misses, reads
PostgreSQL (`_credential_sql`, the query heartbeats used to run every time) and stores what it read,
unless an invalidation happened since it looked (the counter moved): a read from before a commit can
never be stored after that commit's invalidation. A write that bypasses model signals
(`QuerySet.update`, `bulk_create`) takes effect at the entry's expiry, as does an invalidation lost
to a Redis outage (logged); nothing else is needed for new rows, since a missing entry is a miss.
"""

from __future__ import annotations

import functools
import logging

import redis
from django.db import connection, transaction

from agent import buffer
from agent.conf import settings

log = logging.getLogger(__name__)

# Store the entry only if no invalidation happened since the caller read the counter (ARGV[1]).
_POPULATE = """
if (redis.call('GET', KEYS[2]) or '') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return 1
"""


def _key(instance_id: int) -> str:
    return f"{settings.REDIS_KEY_PREFIX}:agent-credential:{instance_id}"


def _generation_key(instance_id: int) -> str:
    return f"{settings.REDIS_KEY_PREFIX}:agent-credential:gen:{instance_id}"


@functools.cache
def _credential_sql() -> str:
    from agent.models import AgentCredential

    instance_table = AgentCredential._meta.get_field("instance").related_model._meta.db_table
    return (
        f'SELECT c.secret, i.status FROM "{AgentCredential._meta.db_table}" c'  # noqa: S608 (our table names)
        f' JOIN "{instance_table}" i ON i.id = c.instance_id WHERE c.instance_id = %s'
    )


def _from_postgresql(instance_id: int) -> tuple[str, str] | None:
    """Raw SQL: the ORM would decrypt the secret, and its query building costs as much as the query."""
    with connection.cursor() as cursor:
        cursor.execute(_credential_sql(), [instance_id])
        found = cursor.fetchone()
    if not connection.in_atomic_block:
        # what Django does after each request (this may run outside one: dumont.wsgi's lean path)
        connection.close_if_unusable_or_obsolete()
    return found


def credential(instance_id: int) -> tuple[str, str] | None:
    """(encrypted secret, instance status), or None when the instance has no credential.
    Raises redis.RedisError when Redis is unavailable."""
    packed, generation = buffer.call("MGET", _key(instance_id), _generation_key(instance_id), idempotent=True)
    if packed is not None:
        status, ciphertext = packed.decode().split("\n", 1)
        return ciphertext, status
    found = _from_postgresql(instance_id)
    if found is not None:
        ciphertext, status = found
        buffer.call_script(_POPULATE, keys=[_key(instance_id), _generation_key(instance_id)],
                           args=[generation or b"", f"{status}\n{ciphertext}", settings.AGENT_MIRROR_TTL_SECONDS])
    return found


def invalidate(instance_id: int) -> None:
    """Drop the instance's entry, now and again right after the current transaction commits."""
    _invalidate(instance_id)
    transaction.on_commit(functools.partial(_invalidate, instance_id))


def _invalidate(instance_id: int) -> None:
    try:
        pipe = buffer.client().pipeline(transaction=True)
        pipe.incr(_generation_key(instance_id))
        # outlives any entry stored before it (an entry lives AGENT_MIRROR_TTL_SECONDS at most)
        pipe.expire(_generation_key(instance_id), settings.AGENT_MIRROR_TTL_SECONDS * 2)
        pipe.delete(_key(instance_id))
        pipe.execute()
    except redis.RedisError:
        # never fail the caller's write for this: the entry expires after AGENT_MIRROR_TTL_SECONDS
        log.warning("could not invalidate the agent credential mirror of instance %s", instance_id, exc_info=True)
