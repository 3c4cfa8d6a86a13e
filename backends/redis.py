"""Redis result backend: storing and reading results in Celery's keys, JSON and channels.

Waiting for a result is ``redis_wait`` (pub/sub), chords ``redis_chord`` (Celery's chord
keys), calling Redis (retries, error translation) ``redis_calls``.

Features:

* Celery's layout (../shared/spec/celery-wire.md §6.3): one key per task,
  ``celery-task-meta-<task_id>``, one per group, ``celery-taskset-meta-<group_id>``
  (``{"result": <group tuple>, "date_done": ...}``; Celery reads only ``result``),
  values in ``result_serializer``. ``global_keyprefix`` is prepended to every key
  (with ``_`` appended unless it already ends in one of ``: _ - .``).
* A store is ``SETEX key <result_expires> <meta>`` (``SET`` without expiry) and
  ``PUBLISH key <meta>`` in one MULTI/EXEC, so Celery's ``AsyncResult.get()``
  (subscribed to the key's channel) wakes on our results. The transaction runs
  under ``WATCH``: a stored SUCCESS is never overwritten, even by a racing writer.
* ``wait_for`` is pushed: GET; else SUBSCRIBE to the key's channel and wait for a
  message carrying a ready state (``redis_wait``).
* ``get_task_metas``: one ``MGET``; ``task_result_exists``: ``EXISTS``.
* ``incr``: ``INCR`` + ``EXPIRE`` in one MULTI/EXEC; the key gets the global prefix.
* ``chord_store``: Celery's chord keys (``redis_chord``), not ``incr``, so Celery and
  taskframe workers complete one chord together.
* Revoked ids: a sorted set, each add one Lua script run (``redis_revokes``).
* Connection errors are retried (``max_retries`` times, with backoff); every redis-py
  error that still escapes becomes ``taskframe.errors.BackendError`` (``redis_calls``).
* ``cleanup`` is rarely needed (keys expire by TTL): it SCANs this backend's
  prefixes and deletes metas whose ``date_done`` is older than ``expires``.

URLs: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS),
``redis+socket:///path/to/redis.sock?virtual_host=<db>``, ``sentinel://host:port/db``
(transport option ``master_name``). Query options are read as transport options.

Options (``BackendOptions``): ``serializer``, ``accept``, ``expires`` (the TTL;
``None`` or <= 0: keys never expire), ``failure_expires`` (the TTL of FAILURE
results, as Celery 5.7's ``result_failure_expires``; ``None``: ``expires``),
``extended``, ``transport_options`` (``global_keyprefix``, ``max_retries`` (4),
``socket_timeout``, ``socket_connect_timeout``, ``health_check_interval``,
``client_name``, ``username``, ``password``, ``master_name``, ``sentinel_kwargs``,
``ssl``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, ClassVar, TypeVar, cast
from urllib.parse import parse_qsl, urlsplit

import redis
import redis.client
import redis.exceptions

from taskframe import states
from taskframe.backends import redis_calls
from taskframe.backends._codec import ResultCodec
from taskframe.backends.base import Backend, BackendOptions
from taskframe.backends.chord import ChordStore
from taskframe.backends.redis_calls import as_bytes
from taskframe.backends.redis_chord import RedisChordStore
from taskframe.backends.redis_revokes import RedisRevokes
from taskframe.backends.redis_wait import PubSubWaiter
from taskframe.errors import BackendError, DecodeError, ImproperlyConfigured
from taskframe.protocol.results import ResultContext, ResultMeta, make_meta
from taskframe.transport import errors as transport_errors
from taskframe.transport.redis_layout import build_client

__all__ = ["RedisBackend"]

T = TypeVar("T")

# -- key prefixes (Celery's, §6.3); the global prefix goes in front of each -----------------
TASK_KEY_PREFIX = "celery-task-meta-"
GROUP_KEY_PREFIX = "celery-taskset-meta-"
#: Separators that end a global prefix as it is; any other end gets ``_`` appended.
PREFIX_SEPARATORS = ":_-."

#: Retries after the first attempt, for connection errors.
MAX_RETRIES = 4
#: WATCH/MULTI attempts of one store before giving up (each failure is another's success).
MAX_WATCH_ATTEMPTS = 1000

# store_result in one round trip (JSON results): keep a stored SUCCESS, else SET/SETEX and
# PUBLISH, atomically inside Redis. Profiling `.delay().get()` showed WATCH + GET + MULTI/EXEC
# at ~245 us per store against ~58 us for a PING. ARGV: the encoded meta, the TTL ('' = none).
STORE_SCRIPT = """
local current = redis.call('GET', KEYS[1])
if current then
  local ok, stored = pcall(cjson.decode, current)
  if ok and type(stored) == 'table' and stored['status'] == 'SUCCESS' then
    return current
  end
end
if ARGV[2] == '' then
  redis.call('SET', KEYS[1], ARGV[1])
else
  redis.call('SETEX', KEYS[1], ARGV[2], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return false
"""


class RedisBackend(Backend):
    """Results in Redis keys shared with Celery's ``RedisBackend``.

    Attributes:
        codec: encodes and decodes stored values (``result_serializer``).
        keyprefix: the global key prefix, ``""`` when none is set.
        max_retries: retries after a connection error.
    """

    schemes: ClassVar[tuple[str, ...]] = ("redis", "rediss", "sentinel")
    supports_push: ClassVar[bool] = True

    def __init__(self, url: str, options: BackendOptions | None = None) -> None:
        super().__init__(url, options)
        query = dict(parse_qsl(urlsplit(url).query))
        self._transport_options: dict[str, Any] = {**query, **self.options.transport_options}
        self.codec = ResultCodec(self.options.serializer, self.options.accept,
                                 self.options.max_message_size)
        # The script reads stored values as JSON: only when nothing else can be stored here.
        self._json_only = self.codec.serializer == "json" and not any(
            self.codec.accepts(name) for name in ("pickle", "msgpack", "yaml"))
        prefix = str(self._transport_options.get("global_keyprefix") or "")
        if prefix and prefix[-1] not in PREFIX_SEPARATORS:
            prefix += "_"
        self.keyprefix = prefix
        try:
            self._client, self.db = build_client(url, self._transport_options)
        except transport_errors.ImproperlyConfigured as exc:
            raise ImproperlyConfigured(f"result_backend: {exc}") from exc
        self._store_script = self._client.register_script(STORE_SCRIPT)
        self._revokes = RedisRevokes(self._client, prefix)
        try:
            self.max_retries = int(self._transport_options.get("max_retries", MAX_RETRIES))
        except ValueError as exc:
            raise ImproperlyConfigured(f"result_backend: max_retries: {exc}") from exc
        self._waiter = PubSubWaiter(self._client, self.max_retries, self.task_key,
                                    self._decode_meta)

    # -- keys and encoding ----------------------------------------------------------------

    def task_key(self, task_id: str) -> str:
        """The key (and pub/sub channel) of a task's meta."""
        return f"{self.keyprefix}{TASK_KEY_PREFIX}{task_id}"

    def group_key(self, group_id: str) -> str:
        """The key of a group's meta."""
        return f"{self.keyprefix}{GROUP_KEY_PREFIX}{group_id}"

    def _expires(self, state: str | None = None) -> int | None:
        expires = self.options.expires if state is None else self.expires_for(state)
        if expires is None or expires <= 0:
            return None
        return max(1, math.ceil(expires))

    def _decode_meta(self, task_id: str, raw: bytes | None) -> ResultMeta:
        if raw is None:
            return make_meta(task_id, states.PENDING, None)
        meta = self.codec.decode(raw)
        if not isinstance(meta, dict):
            raise DecodeError(f"the result of {task_id} is not a meta: {type(meta).__name__}")
        for name, default in (("result", None), ("traceback", None), ("children", []),
                              ("date_done", None), ("task_id", task_id)):
            meta.setdefault(name, default)
        return cast(ResultMeta, meta)

    # -- plumbing -------------------------------------------------------------------------

    def run(self, what: str, fn: Callable[[redis.Redis], T]) -> T:
        """Call ``fn`` with the client, connection errors retried (``what``: for messages).

        Raises:
            BackendError: Redis failed, even after retries.
        """
        return redis_calls.run(self._client, self.max_retries, what, fn)

    def _write(self, pipe: redis.client.Pipeline, key: str, data: bytes,
               state: str | None = None) -> None:
        expires = self._expires(state)
        if expires is None:
            pipe.set(key, data)
        else:
            # SETEX as Celery sends it (redis-py deprecates its setex() wrapper).
            pipe.execute_command("SETEX", key, expires, data)  # type: ignore[no-untyped-call]
        pipe.publish(key, data)

    # -- task results ---------------------------------------------------------------------

    def store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        *,
        traceback: str | None = None,
        context: ResultContext | None = None,
    ) -> ResultMeta:
        """Store and publish ``state``/``result``; a stored SUCCESS is kept and returned.

        Raises:
            EncodeError: the result cannot be serialized.
            BackendError: Redis failed, even after retries.
        """
        meta = make_meta(task_id, state, result, traceback=traceback, context=context,
                         extended=self.options.extended)
        data = self.codec.encode(meta)
        key = self.task_key(task_id)

        if self._json_only:
            expires = self._expires(state)
            ttl = "" if expires is None else str(expires)

            def write_once(client: redis.Redis) -> bytes | None:
                kept = self._store_script(keys=[key], args=[data, ttl], client=client)
                return as_bytes(kept) if kept else None

            kept = self.run(f"storing the result of {task_id}", write_once)
            return meta if kept is None else self._decode_meta(task_id, kept)

        def write(client: redis.Redis) -> bytes | None:
            with client.pipeline() as pipe:
                for _ in range(MAX_WATCH_ATTEMPTS):
                    try:
                        pipe.watch(key)  # type: ignore[no-untyped-call]
                        current = as_bytes(pipe.get(key))
                        if current is not None and self._is_success(current):
                            pipe.unwatch()
                            return current
                        pipe.multi()
                        self._write(pipe, key, data, state)
                        pipe.execute()
                        return None
                    except redis.exceptions.WatchError:
                        continue  # another writer got in between: look again
            raise BackendError(f"too many concurrent writers of {key}")

        kept = self.run(f"storing the result of {task_id}", write)
        return meta if kept is None else self._decode_meta(task_id, kept)

    def _is_success(self, raw: bytes) -> bool:
        try:
            stored = self.codec.decode(raw)
        except Exception:  # unreadable bytes are not a SUCCESS we could keep
            return False
        return isinstance(stored, dict) and stored.get("status") == states.SUCCESS

    def get_task_meta(self, task_id: str) -> ResultMeta:
        """The stored meta, or a PENDING meta."""
        key = self.task_key(task_id)
        raw = self.run(f"reading the result of {task_id}",
                       lambda client: as_bytes(client.get(key)))
        return self._decode_meta(task_id, raw)

    def get_task_metas(self, task_ids: Iterable[str]) -> dict[str, ResultMeta]:
        """The metas of ``task_ids`` with one ``MGET`` (PENDING metas for unknown ids)."""
        ids = list(dict.fromkeys(task_ids))
        if not ids:
            return {}
        keys = [self.task_key(task_id) for task_id in ids]
        raws = self.run(f"reading {len(ids)} results",
                        lambda client: [as_bytes(value) for value in client.mget(keys)])
        return {task_id: self._decode_meta(task_id, raw)
                for task_id, raw in zip(ids, raws, strict=True)}

    def task_result_exists(self, task_id: str) -> bool:
        """True when the key of ``task_id`` exists (``EXISTS``)."""
        key = self.task_key(task_id)
        return bool(self.run(f"checking the result of {task_id}",
                             lambda client: client.exists(key)))

    def wait_for(
        self, task_id: str, timeout: float | None = None, interval: float = 0.5
    ) -> ResultMeta:
        """Block until ``task_id`` is ready, woken by the PUBLISH of its store.

        ``interval`` is unused: nothing polls, except once after a reconnect and
        after ``redis_wait.SAFETY_POLL`` seconds without any message.

        Raises:
            taskframe.errors.TimeoutError: not ready within ``timeout``.
            BackendError: Redis failed, even after retries.
        """
        meta = self.get_task_meta(task_id)
        if meta["status"] in states.READY_STATES:
            return meta
        return self._waiter.wait(task_id, timeout)

    def forget(self, task_id: str) -> None:
        """Delete the key of ``task_id``."""
        key = self.task_key(task_id)
        self.run(f"forgetting {task_id}", lambda client: client.delete(key))

    # -- groups and counters --------------------------------------------------------------

    def save_group(self, group_id: str, result: Any) -> None:
        """Store (and publish, as Celery does) a group's result tuple."""
        key = self.group_key(group_id)
        data = self.codec.encode({"result": result,
                                  "date_done": datetime.now(UTC).isoformat()})

        def write(client: redis.Redis) -> None:
            with client.pipeline() as pipe:
                self._write(pipe, key, data)
                pipe.execute()

        self.run(f"saving group {group_id}", write)

    def restore_group(self, group_id: str) -> Any | None:
        """The stored group tuple, or ``None``."""
        key = self.group_key(group_id)
        raw = self.run(f"restoring group {group_id}", lambda client: as_bytes(client.get(key)))
        if raw is None:
            return None
        meta = self.codec.decode(raw)
        return meta.get("result") if isinstance(meta, dict) else None

    def delete_group(self, group_id: str) -> None:
        """Delete a stored group."""
        key = self.group_key(group_id)
        self.run(f"deleting group {group_id}", lambda client: client.delete(key))

    def incr(self, key: str) -> int:
        """``INCR`` counter ``key`` (global prefix added) and refresh its TTL.

        Note: a connection lost while the server runs the INCR is retried, so in
        that rare case one call may count twice.
        """
        name = f"{self.keyprefix}{key}"
        expires = self._expires()

        def incr(client: redis.Redis) -> int:
            with client.pipeline() as pipe:
                pipe.incr(name)
                if expires is not None:
                    pipe.expire(name, expires)
                return int(pipe.execute()[0])

        return self.run(f"incrementing counter {key}", incr)

    def delete_counter(self, key: str) -> None:
        """``DEL`` counter ``key`` (global prefix added)."""
        name = f"{self.keyprefix}{key}"
        self.run(f"deleting counter {key}", lambda client: client.delete(name))

    def chord_store(self) -> ChordStore:
        """Celery's chord keys (``redis_chord``): Celery workers count the same chords."""
        return RedisChordStore(self)

    # -- revoked task ids -----------------------------------------------------------------

    def add_revokes(self, entries: Mapping[str, float]) -> None:
        """Add the ids to the sorted set in one script run (atomic per id and per call)."""
        if entries:
            self.run("recording revoked ids", partial(self._revokes.add, entries=entries))

    def load_revokes(self) -> dict[str, float]:
        """The ids of the sorted set not expired yet."""
        return self.run("loading revoked ids", self._revokes.load)

    def revokes_version(self) -> str | None:
        """The token the last add wrote (one ``GET``)."""
        return self.run("reading the revoked ids' version", self._revokes.version)

    # -- housekeeping ---------------------------------------------------------------------

    def cleanup(self) -> int:
        """Delete metas whose ``date_done`` is older than ``expires``; return how many.

        Keys expire by their TTL, so this only matters after ``expires`` was
        lowered. It SCANs every key under this backend's prefixes: O(keys).
        """
        if self.options.expires is None and self.options.failure_expires is None:
            return 0
        now = datetime.now(UTC)
        deleted = 0
        for prefix in (TASK_KEY_PREFIX, GROUP_KEY_PREFIX):
            pattern = _glob_escape(f"{self.keyprefix}{prefix}") + "*"
            deleted += self.run("cleaning up expired results",
                                partial(self._delete_older, pattern=pattern, now=now))
        return deleted

    def _delete_older(self, client: redis.Redis, pattern: str, now: datetime) -> int:
        deleted = 0
        keys = list(client.scan_iter(match=pattern, count=500))
        for start in range(0, len(keys), 500):
            batch = keys[start:start + 500]
            raws = [as_bytes(value) for value in client.mget(batch)]
            old = [key for key, raw in zip(batch, raws, strict=True)
                   if raw is not None and self._expired(raw, now)]
            if old:
                deleted += int(client.delete(*old))
        return deleted

    def _expired(self, raw: bytes, now: datetime) -> bool:
        try:
            meta = self.codec.decode(raw)
            if not isinstance(meta, dict) or not meta.get("date_done"):
                return False
            keep = self.expires_for(str(meta.get("status")))  # groups: no status, expires
            done = datetime.fromisoformat(str(meta["date_done"]))
            return keep is not None and done < now - timedelta(seconds=keep)
        except Exception:  # foreign or unreadable values are not ours to delete
            return False

    def close(self) -> None:
        """Disconnect the idle subscribers and the connection pool. Idempotent."""
        self._waiter.close()
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            self._client.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} db={self.db} prefix={self.keyprefix!r}>"


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)
