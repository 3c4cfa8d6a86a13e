"""Chord counting on the Redis result backend, in Celery's key layout.

Celery's Redis backend does not ``INCR`` a counter per part: each part adds its
outcome to a sorted set and the size comes from a key the client wrote. Using
the same keys lets Celery and taskframe workers complete one chord together
(../shared/spec/celery-internals.md §7.4). For a group id ``<gid>``, under the
backend's prefix, ``celery-taskset-meta-<gid>`` plus:

* ``.s``: the header size (``set_chord_size``, written before the header is sent);
* ``.t``: how many tasks ``add_to_chord`` added (``INCR``);
* ``.j``: the parts, ``[1, task_id, state, result]`` encoded with the result
  serializer; a sorted set scored by ``group_index`` (a list when the
  ``result_chord_ordered`` transport option is false);
* ``.d``: ``<task_id>:<group_index>`` of parts already added (a redelivered part
  is not counted twice);
* ``.c``: the claim of the part that sends the body (``SET NX`` with a lease,
  then ``done`` for a while so a late duplicate cannot start the chord again).

One Lua script adds the part, counts, and takes the claim when the count reaches
``size + added``, atomically: exactly one part sends the body.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from taskframe import states
from taskframe.protocol.results import decode_exception, encode_exception

if TYPE_CHECKING:
    from taskframe.backends.base import Backend
    from taskframe.context import Context

__all__ = ["Claim", "add_to_chord", "handles", "part_return", "release", "set_chord_size"]

#: Seconds the claim lasts while the body is being sent (Celery: 2 x join timeout, min 5).
CLAIM_SECONDS = 10
#: Seconds the ``done`` marker keeps late duplicates out (Celery's minimum).
DONE_SECONDS = 300

# KEYS: .j .t .s .d group .c   ARGV: tid, value, ordered, score, expires, claim_s, token
_PART = """
if redis.call('GET', KEYS[6]) == 'done' then
  return {-1, 0, false, 0}
end
local member = ARGV[1] .. ':' .. ARGV[4]
if redis.call('SADD', KEYS[4], member) == 1 then
  if ARGV[3] == '1' then
    redis.call('ZADD', KEYS[1], ARGV[4], ARGV[2])
  else
    redis.call('RPUSH', KEYS[1], ARGV[2])
  end
end
local count
if ARGV[3] == '1' then
  count = redis.call('ZCARD', KEYS[1])
else
  count = redis.call('LLEN', KEYS[1])
end
local ttl = tonumber(ARGV[5])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
  redis.call('EXPIRE', KEYS[3], ttl)
  redis.call('EXPIRE', KEYS[4], ttl)
end
local added = redis.call('GET', KEYS[2])
local size = redis.call('GET', KEYS[3])
local claimed = 0
if size and count == tonumber(size) + tonumber(added or '0') then
  if redis.call('SET', KEYS[6], ARGV[7], 'NX', 'EX', tonumber(ARGV[6])) then
    claimed = 1
  end
end
return {count, added, size, claimed}
"""

# KEYS: .c .j .t .s .d   ARGV: token, done_s
_RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
redis.call('SET', KEYS[1], 'done', 'EX', tonumber(ARGV[2]))
return 1
"""


@dataclass
class Claim:
    """This worker won the right to end the chord: the parts, in header order."""

    token: str
    parts: list[tuple[str, str, Any]] = field(default_factory=list)
    #: The header's result tuples, when a Celery client saved them (group results inside).
    shape: list[Any] | None = None


def handles(backend: Backend) -> bool:
    """True for taskframe's Redis result backend."""
    from taskframe.backends.redis import RedisBackend

    return isinstance(backend, RedisBackend)


def _keys(backend: Any, group_id: str) -> dict[str, str]:
    base = backend.group_key(group_id)
    return {suffix: base + "." + suffix for suffix in "jtsdc"} | {"group": base}


def _ttl(backend: Any) -> int:
    expires = backend.options.expires
    return 0 if expires is None or expires <= 0 else max(1, int(expires))


def _ordered(backend: Any) -> bool:
    value = backend.options.transport_options.get("result_chord_ordered", True)
    return str(value).lower() not in ("0", "false", "no", "off")


def set_chord_size(backend: Backend, group_id: str, size: int) -> None:
    """Write the header size (and forget an old claim: a frozen chord can be reapplied)."""
    keys = _keys(backend, group_id)
    ttl = _ttl(backend)

    def write(client: Any) -> None:
        with client.pipeline() as pipe:
            pipe.delete(keys["c"])
            pipe.set(keys["s"], size, ex=ttl or None)
            pipe.execute()

    backend._run(f"setting the size of chord {group_id}", write)  # type: ignore[attr-defined]


def add_to_chord(backend: Backend, group_id: str) -> None:
    """Count one more header task (``Task.add_to_chord``)."""
    key = _keys(backend, group_id)["t"]
    backend._run(f"adding to chord {group_id}",  # type: ignore[attr-defined]
                 lambda client: client.incr(key))


def part_return(backend: Backend, ctx: Context, state: str, value: Any) -> Claim | None:
    """Add one part; when it completes the chord and wins the claim, the parts in order."""
    group_id = str(ctx.group)
    keys = _keys(backend, group_id)
    codec: Any = backend._codec  # type: ignore[attr-defined]
    stored = encode_exception(value) if isinstance(value, BaseException) else value
    encoded = codec.encode([1, ctx.id, state, stored])
    ordered = _ordered(backend)
    score = "+inf" if ctx.group_index is None else str(ctx.group_index)
    token = uuid.uuid4().hex
    argv = [str(ctx.id), encoded, "1" if ordered else "0", score, _ttl(backend),
            CLAIM_SECONDS, token]
    order = [keys["j"], keys["t"], keys["s"], keys["d"], keys["group"], keys["c"]]

    def run(client: Any) -> list[Any]:
        result: list[Any] = client.eval(_PART, len(order), *order, *argv)
        return result

    _count, _added, _size, claimed = backend._run(  # type: ignore[attr-defined]
        f"counting chord {group_id}", run)
    if not claimed:
        return None

    def read(client: Any) -> list[bytes]:
        if ordered:
            return list(client.zrange(keys["j"], 0, -1))
        return list(client.lrange(keys["j"], 0, -1))

    raws = backend._run(f"reading chord {group_id}", read)  # type: ignore[attr-defined]
    return Claim(token, [_decode_part(codec, raw) for raw in raws], _shape(backend, group_id))


def _shape(backend: Backend, group_id: str) -> list[Any] | None:
    """The header's result tuples a Celery client saved (``apply_chord``) when some are
    group results, so the body gets their values nested; taskframe saves none."""
    saved = backend.restore_group(group_id)
    if not isinstance(saved, list | tuple) or len(saved) != 2:
        return None
    children = saved[1]
    return list(children) if isinstance(children, list | tuple) else None


def _decode_part(codec: Any, raw: bytes) -> tuple[str, str, Any]:
    _, task_id, state, value = codec.decode(raw)
    if state in states.EXCEPTION_STATES and isinstance(value, dict) and "exc_type" in value:
        value = decode_exception(value)
    return str(task_id), str(state), value


def release(backend: Backend, group_id: str | None, claim: Claim) -> None:
    """Delete the chord's keys and leave the ``done`` marker (only while we hold the claim)."""
    if group_id is None:
        return
    keys = _keys(backend, group_id)
    order = [keys["c"], keys["j"], keys["t"], keys["s"], keys["d"]]
    backend._run(f"releasing chord {group_id}",  # type: ignore[attr-defined]
                 lambda client: client.eval(_RELEASE, len(order), *order, claim.token,
                                            DONE_SECONDS))
