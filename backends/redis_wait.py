"""Waiting for a result on the Redis result backend: pushed by pub/sub, not polled.

A store PUBLISHes the meta on the channel named after the task's key (``redis``). A
waiter SUBSCRIBEs to that channel, waits for the subscription to be confirmed, GETs again
(closing the race with a store between the two), then waits for a message carrying a
ready state. Subscriber connections are reused and always left unsubscribed; on a dropped
connection the waiter re-subscribes and polls once (GET) before waiting again.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable

import redis
import redis.client
import redis.exceptions

from taskframe import states
from taskframe.backends.redis_calls import CONNECTION_ERRORS, as_bytes, backoff
from taskframe.errors import BackendError
from taskframe.errors import TimeoutError as ResultTimeout
from taskframe.protocol.results import ResultMeta

__all__ = ["PubSubWaiter"]

#: A waiter also GETs after this long without a message (a lost PUBLISH cannot hang it).
SAFETY_POLL = 30.0
#: Idle subscriber connections kept for reuse.
MAX_IDLE_SUBSCRIBERS = 8
#: How long to wait for a SUBSCRIBE/UNSUBSCRIBE confirmation.
CONFIRM_TIMEOUT = 10.0


class PubSubWaiter:
    """Waits for task results on their channels, with a pool of idle subscribers.

    Args:
        client: the backend's client (GETs and new subscriber connections).
        max_retries: retries after a connection error (a fresh budget once subscribed).
        key: a task's key, which is also its channel.
        decode: a task's meta from its stored bytes (``None``: PENDING).
    """

    def __init__(self, client: redis.Redis, max_retries: int, key: Callable[[str], str],
                 decode: Callable[[str, bytes | None], ResultMeta]) -> None:
        self._client = client
        self.max_retries = max_retries
        self._key = key
        self._decode = decode
        self._lock = threading.Lock()
        self._idle: list[redis.client.PubSub] = []
        self._pid = os.getpid()

    def wait(self, task_id: str, timeout: float | None) -> ResultMeta:
        """Block until ``task_id`` is ready, woken by the PUBLISH of its store.

        Raises:
            taskframe.errors.TimeoutError: not ready within ``timeout``.
            BackendError: Redis failed, even after retries.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        attempt = 0
        subscribed: list[bool] = []
        while True:
            try:
                found = self._wait_subscribed(task_id, deadline, subscribed)
            except CONNECTION_ERRORS as exc:
                if subscribed:  # the link worked before it dropped: a fresh budget
                    attempt = 0
                    subscribed.clear()
                if attempt >= self.max_retries:
                    raise BackendError(
                        f"waiting for {task_id} failed after {attempt + 1} attempts: "
                        f"{type(exc).__name__}: {exc}") from exc
                remaining = None if deadline is None else deadline - time.monotonic()
                time.sleep(backoff(attempt) if remaining is None
                           else max(0.0, min(backoff(attempt), remaining)))
                attempt += 1
                continue
            except redis.exceptions.RedisError as exc:
                raise BackendError(f"waiting for {task_id} failed: {exc}") from exc
            if found is None:
                raise ResultTimeout(f"task {task_id} not ready after {timeout} s")
            return found

    def _wait_subscribed(self, task_id: str, deadline: float | None,
                         subscribed: list[bool]) -> ResultMeta | None:
        """Subscribe, GET, wait for a ready message; ``None`` at the deadline.

        Appends to ``subscribed`` once the subscription is confirmed.
        """
        key = self._key(task_id)
        sub = self._checkout()
        clean = False
        try:
            sub.subscribe(key)
            self._confirm(sub, "subscribe")
            subscribed.append(True)
            meta = self._decode(task_id, as_bytes(self._client.get(key)))
            last_poll = time.monotonic()
            while meta["status"] not in states.READY_STATES:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    break
                if now - last_poll >= SAFETY_POLL:
                    meta = self._decode(task_id, as_bytes(self._client.get(key)))
                    last_poll = now
                    continue
                wait = SAFETY_POLL if deadline is None else min(SAFETY_POLL, deadline - now)
                message = sub.get_message(timeout=max(wait, 0.0))
                if message is not None and message["type"] == "message":
                    meta = self._decode(task_id, as_bytes(message["data"]))
                    last_poll = time.monotonic()
            # The confirmation is read when the subscriber is next checked out, not
            # here: waiting for it cost a round trip (~0.25 ms of a ~2 ms
            # ``.delay().get()``, measured) between the result and the caller.
            sub.unsubscribe(key)  # type: ignore[no-untyped-call]
            clean = True
            return meta if meta["status"] in states.READY_STATES else None
        finally:
            self._checkin(sub, clean)

    @staticmethod
    def _confirm(sub: redis.client.PubSub, kind: str) -> None:
        """Read until the server confirms a (un)subscription; other messages are dropped."""
        deadline = time.monotonic() + CONFIRM_TIMEOUT
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise redis.exceptions.TimeoutError(f"no {kind} confirmation from Redis")
            message = sub.get_message(timeout=remaining)
            if message is not None and message["type"] == kind:
                return

    def _checkout(self) -> redis.client.PubSub:
        """An idle subscriber with no subscription left, or a new one."""
        while True:
            with self._lock:
                if self._pid != os.getpid():
                    self._idle.clear()  # the parent's sockets: not ours to use or close
                    self._pid = os.getpid()
                sub = self._idle.pop() if self._idle else None
            if sub is None:
                fresh: redis.client.PubSub = self._client.pubsub()
                return fresh
            if not sub.subscribed:
                return sub
            # Its last UNSUBSCRIBE was sent without waiting (``_wait_subscribed``); the
            # reply is normally here already. Messages still queued for that channel go
            # with it. A subscriber that cannot confirm is closed and another one tried.
            try:
                self._confirm(sub, "unsubscribe")  # its one channel: none is left
            except CONNECTION_ERRORS:
                self._checkin(sub, clean=False)
                continue
            return sub

    def _checkin(self, sub: redis.client.PubSub, clean: bool) -> None:
        # A subscriber is reused only when its last subscription was undone (``clean``:
        # UNSUBSCRIBE sent, confirmed or not); any other is disconnected, which drops
        # its subscriptions on the server.
        if clean:
            with self._lock:
                if len(self._idle) < MAX_IDLE_SUBSCRIBERS and self._pid == os.getpid():
                    self._idle.append(sub)
                    return
        # Closing a broken connection may fail: nothing is left to release then.
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            sub.close()

    def close(self) -> None:
        """Disconnect the idle subscribers. Idempotent."""
        with self._lock:
            idle, self._idle = self._idle, []
        for sub in idle:
            self._checkin(sub, clean=False)
