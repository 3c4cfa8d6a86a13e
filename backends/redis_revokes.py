"""Revoked task ids in Redis: one sorted set, each id added atomically by a script.

Under the backend's prefix, ``taskframe-revoked`` is a sorted set of task ids scored by
their expiry (unix seconds) and ``taskframe-revoked-version`` a token rewritten by every
add. One Lua script adds the ids (an id already there keeps the later expiry), drops the
expired ones, rewrites the token and sets both keys to expire with the last id. Each add
is one script run, atomic inside Redis, so concurrent revokers never lose one another's
ids (a read-merge-write of one value did). A worker catching up reads the token (one
``GET``) and loads the set only when it changed.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from taskframe.backends.redis_calls import as_bytes

if TYPE_CHECKING:
    import redis

__all__ = ["REVOKED_KEY", "VERSION_KEY", "RedisRevokes"]

REVOKED_KEY = "taskframe-revoked"
VERSION_KEY = "taskframe-revoked-version"

# KEYS: the set, the version.  ARGV: now, token, then task id and expiry pairs.
_ADD = """
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
for i = 3, #ARGV, 2 do
  local at = tonumber(ARGV[i + 1])
  local known = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if (not known) or tonumber(known) < at then
    redis.call('ZADD', KEYS[1], at, ARGV[i])
  end
end
redis.call('SET', KEYS[2], ARGV[2])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if last[2] then
  local until_at = math.ceil(tonumber(last[2])) + 1
  redis.call('EXPIREAT', KEYS[1], until_at)
  redis.call('EXPIREAT', KEYS[2], until_at)
end
return 1
"""


class RedisRevokes:
    """The calls behind ``RedisBackend.add_revokes``/``load_revokes``/``revokes_version``.

    Args:
        client: the backend's client.
        keyprefix: the backend's global key prefix.
    """

    def __init__(self, client: redis.Redis, keyprefix: str) -> None:
        self.key = f"{keyprefix}{REVOKED_KEY}"
        self.version_key = f"{keyprefix}{VERSION_KEY}"
        self._add = client.register_script(_ADD)

    def add(self, client: redis.Redis, entries: Mapping[str, float]) -> None:
        """Run the add script once for all ``entries``."""
        args: list[Any] = [repr(time.time()), uuid.uuid4().hex]
        for task_id, expires_at in entries.items():
            args += [task_id, repr(float(expires_at))]
        self._add(keys=[self.key, self.version_key], args=args, client=client)

    def load(self, client: redis.Redis) -> dict[str, float]:
        """The ids whose expiry is later than now."""
        pairs: list[tuple[Any, float]] = client.zrangebyscore(  # type: ignore[assignment]
            self.key, f"({time.time()!r}", "+inf", withscores=True)
        return {_text(member): float(score) for member, score in pairs}

    def version(self, client: redis.Redis) -> str:
        """The token of the last add (``""`` when nothing is recorded)."""
        raw = as_bytes(client.get(self.version_key))
        return "" if raw is None else raw.decode()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
