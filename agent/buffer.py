"""Heartbeats between the API and PostgreSQL: a Redis list, flushed in batches.

Keys (all under `<REDIS_KEY_PREFIX>:agent:`):
- `nonce:<instance>:<nonce>`  a seen nonce, for the signature window: a replay is refused.
- `buffer`                    accepted heartbeats (JSON), newest at the head; flushers take from the tail.
- `last:<instance>`           the instance's latest heartbeat (JSON, with its receive time): quick reads.
- `processing` + `processing:<token>`  batches a flusher has taken but not yet acknowledged; a batch
  whose flusher died is put back (see `batch_recover_stale`), and the unique nonce column makes a
  second insert of the same heartbeat a no-op.
- `flush-requested`           set while a size-triggered flush is queued, so a busy API queues one, not thousands.

Ingestion is one Lua call (one round trip, atomic): the nonce check and the stores happen together
or not at all, so a refused replay changes nothing.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis
from django.conf import settings

_INGEST = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return {-1, 0} end
local size = redis.call('LPUSH', KEYS[2], ARGV[2])
redis.call('SET', KEYS[3], ARGV[2], 'EX', ARGV[3])
local trigger = 0
if size >= tonumber(ARGV[4]) and redis.call('SET', KEYS[4], '1', 'NX', 'EX', ARGV[5]) then trigger = 1 end
return {size, trigger}
"""

_CLAIM = """
local items = redis.call('LRANGE', KEYS[1], -tonumber(ARGV[1]), -1)
if #items == 0 then return items end
redis.call('LTRIM', KEYS[1], 0, -#items - 1)
redis.call('RPUSH', KEYS[3], unpack(items))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
return items
"""

# Back at the tail, where the next claim takes from: the oldest heartbeats go first.
_RECOVER = """
local items = redis.call('LRANGE', KEYS[2], 0, -1)
if #items > 0 then redis.call('RPUSH', KEYS[3], unpack(items)) end
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[1], ARGV[1])
return #items
"""

# Lua's unpack() takes at most ~8000 values: batches stay well below.
MAX_BATCH = 5000


@functools.cache
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2, health_check_interval=30)


@functools.cache
def _scripts(url: str) -> tuple[Any, Any, Any]:
    client = _client(url)
    return client.register_script(_INGEST), client.register_script(_CLAIM), client.register_script(_RECOVER)


def client() -> redis.Redis:
    return _client(settings.REDIS_URL)


def key(*parts: object) -> str:
    return ":".join([settings.REDIS_KEY_PREFIX, "agent", *map(str, parts)])


def ingest(*, instance_id: int, nonce: str, record: dict[str, Any]) -> tuple[bool, bool]:
    """Store one authenticated heartbeat unless its nonce was seen. Returns (stored, flush_now)."""
    ingest_script = _scripts(settings.REDIS_URL)[0]
    nonce_ttl = settings.AGENT_SIGNATURE_MAX_AGE_SECONDS + settings.AGENT_CLOCK_SKEW_SECONDS + 1
    size, trigger = ingest_script(
        keys=[key("nonce", instance_id, nonce), key("buffer"), key("last", instance_id), key("flush-requested")],
        args=[nonce_ttl, json.dumps(record, separators=(",", ":")), settings.HEARTBEAT_RETENTION_HOURS * 3600,
              settings.AGENT_FLUSH_BATCH_SIZE, settings.AGENT_FLUSH_INTERVAL_SECONDS * 5],
        client=client(),
    )
    return size >= 0, bool(trigger)


def flush_request_clear() -> None:
    client().delete(key("flush-requested"))


def latest(instance_id: int) -> dict[str, Any] | None:
    raw = client().get(key("last", instance_id))
    return json.loads(raw) if raw else None


def pending() -> int:
    """Heartbeats accepted but not yet in PostgreSQL (buffered or in a flusher's hands)."""
    r = client()
    claimed = sum(r.llen(key("processing", token.decode())) for token in r.zrange(key("processing"), 0, -1))
    return r.llen(key("buffer")) + claimed


@dataclass
class Batch:
    token: str
    records: list[dict[str, Any]]

    def ack(self) -> None:
        """The batch is in PostgreSQL: forget it."""
        pipe = client().pipeline()
        pipe.delete(key("processing", self.token))
        pipe.zrem(key("processing"), self.token)
        pipe.execute()


def batch_claim(size: int) -> Batch | None:
    """Take the oldest `size` heartbeats for this flusher alone (two flushers never get the same one)."""
    claim_script = _scripts(settings.REDIS_URL)[1]
    token = uuid.uuid4().hex
    items = claim_script(
        keys=[key("buffer"), key("processing"), key("processing", token)],
        args=[min(size, MAX_BATCH), time.time(), token],
        client=client(),
    )
    if not items:
        return None
    return Batch(token=token, records=[json.loads(item) for item in items])


def batch_recover_stale(older_than: float) -> int:
    """Put back the batches of flushers that took them more than `older_than` seconds ago and never
    acknowledged them (killed mid-flush). Returns how many heartbeats went back."""
    recover_script = _scripts(settings.REDIS_URL)[2]
    r = client()
    stale = r.zrangebyscore(key("processing"), "-inf", time.time() - older_than)
    returned = 0
    for token in stale:
        token = token.decode()
        returned += recover_script(
            keys=[key("processing"), key("processing", token), key("buffer")], args=[token], client=r
        )
    return returned
