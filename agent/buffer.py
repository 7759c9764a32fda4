"""Heartbeats between the API and PostgreSQL: a Redis list, flushed in batches.

Keys (all under `<REDIS_KEY_PREFIX>:agent:`):
- `nonce:<instance>:<nonce>`  a seen nonce, for the signature window: a replay is refused.
- `buffer`                    accepted heartbeats (JSON), newest at the head; flushers take from the tail.
- `last:<instance>`           the instance's latest heartbeat (JSON, with its receive time): quick reads.
- `processing` + `processing:<token>`  batches a flusher has taken but not yet acknowledged; a batch
  whose flusher died is put back (see `batch_recover_stale`), and the unique nonce column makes a
  second insert of the same heartbeat a no-op.
- `rate:<instance>`           heartbeats of the instance in the current AGENT_HEARTBEAT_INTERVAL_SECONDS window.
- `flush-requested`           set while a size-triggered flush is queued, so a busy API queues one, not thousands.
- `dead-letter`               heartbeats PostgreSQL refused, with the reason (newest first, the last
  AGENT_DEAD_LETTER_MAX kept), and `dead-letter-count` (a hash: instance id -> how many, for metrics).

Ingestion is one Lua call (one round trip, atomic): the nonce check and the stores happen together
or not at all, so a refused replay changes nothing.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis

from agent.conf import settings

# -2: over the instance's limit (then the window's seconds left), nothing stored; -1: a replayed nonce
_INGEST = """
if tonumber(ARGV[6]) > 0 then
  local sent = redis.call('INCR', KEYS[5])
  if sent == 1 then redis.call('EXPIRE', KEYS[5], ARGV[7]) end
  if sent > tonumber(ARGV[6]) then return {-2, redis.call('TTL', KEYS[5])} end
end
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
MAX_DEAD_LETTER_RECORD = 20_000


@functools.cache
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2, health_check_interval=30)


@functools.cache
def _scripts(url: str) -> tuple[Any, Any]:
    client = _client(url)
    return client.register_script(_CLAIM), client.register_script(_RECOVER)


def client() -> redis.Redis:
    return _client(settings.REDIS_URL)


# ---- the hot path's Redis calls ---------------------------------------------------------------
# A heartbeat makes two Redis calls (agent.mirror's lookup, then `ingest`). Through redis-py's client
# each cost ~0.13 ms of CPU (argument encoding, pool checkout, retry and telemetry wrappers), more than
# the rest of the heartbeat's work: these go straight to a connection of the calling thread's own.
_local = threading.local()


def _pack(args: tuple[object, ...]) -> bytes:
    """A command in RESP: bytes as they are, anything else as its str()'s UTF-8."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def call(*args: object, idempotent: bool = False) -> Any:
    """Run one command on this thread's connection to REDIS_URL and return its raw reply. Raises
    redis.RedisError; an `idempotent` command is retried once on a connection error (Redis restarted
    since this connection's last use)."""
    url = settings.REDIS_URL
    connections = _local.__dict__.setdefault("connections", {})
    conn = connections.get((url, os.getpid()))  # a forked child opens its own
    if conn is None:
        pool = _client(url).connection_pool
        conn = connections[(url, os.getpid())] = pool.connection_class(**pool.connection_kwargs)
    packed = _pack(args)
    for attempt in (1, 2):
        try:
            conn.send_packed_command([packed], check_health=False)
            return conn.read_response()
        except redis.ResponseError:
            raise  # an error reply: the connection is fine
        except redis.ConnectionError:
            conn.disconnect()
            if not idempotent or attempt == 2:
                raise
        except BaseException:
            conn.disconnect()
            raise
    raise AssertionError("unreachable")


def call_script(script: str, keys: list[object], args: list[object]) -> Any:
    """EVALSHA, loading the script first if this Redis does not know it yet."""
    sha = _sha1(script)
    try:
        return call("EVALSHA", sha, len(keys), *keys, *args)
    except redis.exceptions.NoScriptError:
        call("SCRIPT", "LOAD", script)
        return call("EVALSHA", sha, len(keys), *keys, *args)


@functools.cache
def _sha1(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()  # noqa: S324 (Redis names scripts by their SHA-1)


def key(*parts: object) -> str:
    return ":".join([settings.REDIS_KEY_PREFIX, "agent", *map(str, parts)])


class RateLimited(Exception):
    """The instance sent more heartbeats than its interval allows; nothing was stored."""

    def __init__(self, retry_after: int):
        super().__init__(retry_after)
        self.retry_after = max(1, retry_after)


def ingest(*, instance_id: int, nonce: str, record: dict[str, Any]) -> tuple[bool, bool]:
    """Store one authenticated heartbeat unless its nonce was seen. Returns (stored, flush_now); raises
    RateLimited past AGENT_HEARTBEATS_PER_INTERVAL in the instance's current window."""
    nonce_ttl = settings.AGENT_SIGNATURE_MAX_AGE_SECONDS + settings.AGENT_CLOCK_SKEW_SECONDS + 1
    interval = settings.AGENT_HEARTBEAT_INTERVAL_SECONDS
    window = max(1, math.ceil(interval))  # whole seconds (EXPIRE's unit), the allowance scaled to match
    limit = math.ceil(settings.AGENT_HEARTBEATS_PER_INTERVAL * window / interval)
    size, trigger = call_script(
        _INGEST,
        keys=[key("nonce", instance_id, nonce), key("buffer"), key("last", instance_id), key("flush-requested"),
              key("rate", instance_id)],
        args=[nonce_ttl, json.dumps(record, separators=(",", ":")), settings.HEARTBEAT_RETENTION_HOURS * 3600,
              settings.AGENT_FLUSH_BATCH_SIZE, settings.AGENT_FLUSH_INTERVAL_SECONDS * 5,
              limit, window],
    )
    if size == -2:
        raise RateLimited(trigger)
    return size >= 0, bool(trigger)


def flush_request_clear() -> None:
    client().delete(key("flush-requested"))


def latest(instance_id: int) -> dict[str, Any] | None:
    raw = client().get(key("last", instance_id))
    return json.loads(raw) if raw else None


def latest_many(instance_ids: list[int]) -> dict[int, dict[str, Any]]:
    """`latest` for many instances in one round trip (MGET); instances without one are left out."""
    if not instance_ids:
        return {}
    raws = client().mget([key("last", i) for i in instance_ids])
    return {i: json.loads(raw) for i, raw in zip(instance_ids, raws, strict=True) if raw}


def pending() -> int:
    """Heartbeats accepted but not yet in PostgreSQL (buffered or in a flusher's hands)."""
    r = client()
    claimed = sum(r.llen(key("processing", token.decode())) for token in r.zrange(key("processing"), 0, -1))
    return r.llen(key("buffer")) + claimed


@dataclass
class Batch:
    token: str
    raw: list[bytes]  # the buffered JSON records, as Redis holds them

    @property
    def records(self) -> list[dict[str, Any]]:
        return [json.loads(item) for item in self.raw]

    def ack(self) -> None:
        """The batch is in PostgreSQL: forget it."""
        pipe = client().pipeline()
        pipe.delete(key("processing", self.token))
        pipe.zrem(key("processing"), self.token)
        pipe.execute()


def batch_claim(size: int) -> Batch | None:
    """Take the oldest `size` heartbeats for this flusher alone (two flushers never get the same one)."""
    claim_script = _scripts(settings.REDIS_URL)[0]
    token = uuid.uuid4().hex
    items = claim_script(
        keys=[key("buffer"), key("processing"), key("processing", token)],
        args=[min(size, MAX_BATCH), time.time(), token],
        client=client(),
    )
    if not items:
        return None
    return Batch(token=token, raw=items)


def batch_recover_stale(older_than: float) -> int:
    """Put back the batches of flushers that took them more than `older_than` seconds ago and never
    acknowledged them (killed mid-flush). Returns how many heartbeats went back."""
    recover_script = _scripts(settings.REDIS_URL)[1]
    r = client()
    stale = r.zrangebyscore(key("processing"), "-inf", time.time() - older_than)
    returned = 0
    for token in stale:
        token = token.decode()
        returned += recover_script(
            keys=[key("processing"), key("processing", token), key("buffer")], args=[token], client=r
        )
    return returned


def dead_letter(raw: bytes, *, reason: str) -> None:
    """Set aside a buffered heartbeat that PostgreSQL refused, with why (an operator reads the list)."""
    try:
        instance_id = int(json.loads(raw)["i"])
    except (ValueError, TypeError, KeyError, OverflowError):
        instance_id = 0
    entry = json.dumps({"instance": instance_id, "reason": reason, "at": time.time(),
                        "record": raw[:MAX_DEAD_LETTER_RECORD].decode(errors="replace")})
    pipe = client().pipeline()
    pipe.lpush(key("dead-letter"), entry)
    pipe.ltrim(key("dead-letter"), 0, settings.AGENT_DEAD_LETTER_MAX - 1)
    pipe.hincrby(key("dead-letter-count"), instance_id, 1)
    pipe.execute()


def dead_letters() -> list[dict[str, Any]]:
    return [json.loads(entry) for entry in client().lrange(key("dead-letter"), 0, -1)]


def dead_letter_count(instance_ids: list[int]) -> int:
    """How many heartbeats of these instances were set aside."""
    if not instance_ids:
        return 0
    return sum(int(n or 0) for n in client().hmget(key("dead-letter-count"), instance_ids))
