"""The Redis chord store: chords counted in Celery's own chord keys.

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
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import redis

from taskframe import states
from taskframe.backends.chord import ChordStore, Fired, Part
from taskframe.protocol.results import decode_exception, encode_exception

if TYPE_CHECKING:
    from taskframe.backends._codec import ResultCodec
    from taskframe.backends.redis import RedisBackend

__all__ = ["RedisChordStore"]

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


class RedisChordStore(ChordStore):
    """Chords in Celery's Redis keys, beside the results of ``backend``."""

    def __init__(self, backend: RedisBackend) -> None:
        self.backend = backend

    def _keys(self, group_id: str) -> dict[str, str]:
        base = self.backend.group_key(group_id)
        return {suffix: base + "." + suffix for suffix in "jtsdc"} | {"group": base}

    def _ttl(self) -> int:
        expires = self.backend.options.expires
        return 0 if expires is None or expires <= 0 else max(1, int(expires))

    def _ordered(self) -> bool:
        value = self.backend.options.transport_options.get("result_chord_ordered", True)
        return str(value).lower() not in ("0", "false", "no", "off")

    def record_header(self, group_id: str, task_ids: Sequence[str]) -> None:
        """Write the header size, ``.s`` (and forget an old claim: a frozen chord can be
        reapplied)."""
        keys = self._keys(group_id)
        ttl = self._ttl()
        size = len(task_ids)

        def write(client: redis.Redis) -> None:
            with client.pipeline() as pipe:
                pipe.delete(keys["c"])
                pipe.set(keys["s"], size, ex=ttl or None)
                pipe.execute()

        self.backend.run(f"setting the size of chord {group_id}", write)

    def add_part(self, group_id: str, task_id: str) -> None:
        """Count one more header task in ``.t`` (Celery's ``add_to_chord``)."""
        key = self._keys(group_id)["t"]
        self.backend.run(f"adding to chord {group_id}", lambda client: client.incr(key))

    def count_part(self, group_id: str, task_id: str, state: str, value: Any, *,
                   index: int | None = None, size: int | None = None) -> Fired | None:
        """Add one part to ``.j``; when it completes the chord and wins the claim, the
        parts in order. ``size`` is not used: the client wrote it in ``.s``."""
        keys = self._keys(group_id)
        codec = self.backend.codec
        stored = encode_exception(value) if isinstance(value, BaseException) else value
        encoded = codec.encode([1, task_id, state, stored])
        ordered = self._ordered()
        score = "+inf" if index is None else str(index)
        token = uuid.uuid4().hex
        argv: list[str | bytes | int] = [task_id, encoded, "1" if ordered else "0", score,
                                         self._ttl(), CLAIM_SECONDS, token]
        order = [keys["j"], keys["t"], keys["s"], keys["d"], keys["group"], keys["c"]]

        def run(client: redis.Redis) -> list[Any]:
            return cast(list[Any], client.eval(_PART, len(order), *order, *argv))

        _count, _added, _size, claimed = self.backend.run(f"counting chord {group_id}", run)
        if not claimed:
            return None

        def read(client: redis.Redis) -> list[bytes]:
            found = (client.zrange(keys["j"], 0, -1) if ordered
                     else client.lrange(keys["j"], 0, -1))
            return cast(list[bytes], found)

        raws = self.backend.run(f"reading chord {group_id}", read)
        return Fired([_decode_part(codec, raw) for raw in raws], self._shape(group_id), token)

    def _shape(self, group_id: str) -> list[Any] | None:
        """The header's result tuples a Celery client saved (``apply_chord``) when some are
        group results, so the body gets their values nested; taskframe saves none."""
        saved = self.backend.restore_group(group_id)
        if not isinstance(saved, list | tuple) or len(saved) != 2:
            return None
        children = saved[1]
        return list(children) if isinstance(children, list | tuple) else None

    def release(self, group_id: str, fired: Fired) -> None:
        """Delete the chord's keys and leave the ``done`` marker (only while we hold the
        claim)."""
        token = fired.claim
        if token is None:
            return  # not a claim of this store: nothing of ours to delete
        keys = self._keys(group_id)
        order = [keys["c"], keys["j"], keys["t"], keys["s"], keys["d"]]
        self.backend.run(f"releasing chord {group_id}",
                         lambda client: client.eval(_RELEASE, len(order), *order, token,
                                                    DONE_SECONDS))


def _decode_part(codec: ResultCodec, raw: bytes) -> Part:
    _, task_id, state, value = codec.decode(raw)
    if state in states.EXCEPTION_STATES and isinstance(value, dict) and "exc_type" in value:
        value = decode_exception(value)
    return str(task_id), str(state), value
