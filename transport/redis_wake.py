"""Push wake-ups for an idle Redis consumer, without taking anything off a queue.

The transport never BRPOPs (see ``taskframe.transport.redis``), so an idle consumer needs
another way to learn that a list it consumes changed. Redis 6+ has one that needs no
server configuration: client-side-caching invalidations in broadcasting mode. A
dedicated RESP3 connection runs ``CLIENT TRACKING ON BCAST PREFIX <queue> ...`` and the
server then pushes an invalidation message to it whenever any client writes a key
starting with one of the prefixes: a Celery client's LPUSH, ours, a restore, a delayed
message moving in. The consumer waits on that socket (and on the fanout subscription's)
with ``select`` and claims as soon as something arrives. The invalidations carry no
message, only a wake-up: missing one costs at most the safety-net poll interval.
Pushes are on only while the consumer waits (``arm``/``disarm``): a busy consumer that
does not read them would otherwise make them pile up in the server's memory.

Servers without RESP3 or CLIENT TRACKING (Redis < 6, some proxies, ACLs without
``client``) refuse the setup; ``Waker.open`` then returns ``None`` and the transport polls.

``IdleWait`` is the transport's wait between claims that found nothing: on its waker,
opened for the consumed queues, or by polling with back-off where there is none.
"""

from __future__ import annotations

import logging
import select
import socket
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import redis
import redis.connection

from .redis_layout import translate_errors

if TYPE_CHECKING:
    from .redis_fanout import FanoutSubscriber

__all__ = ["IdleWait", "Waker", "wait_readable"]

logger = logging.getLogger("taskframe.transport.redis")


class Waker:
    """One RESP3 connection subscribed to invalidations of keys under some prefixes."""

    def __init__(self, connection: redis.connection.AbstractConnection,
                 prefixes: Sequence[str]) -> None:
        self.connection = connection
        self.prefixes = list(prefixes)
        self.armed = False
        self._off_sent = False  # CLIENT TRACKING OFF sent, its reply not read yet

    @classmethod
    def open(cls, client: redis.Redis, prefixes: Iterable[str]) -> Waker | None:
        """A waker for ``prefixes`` (overlapping ones are merged), armed; ``None`` if refused.

        Raises:
            redis.exceptions.ConnectionError: the server cannot be reached.
        """
        pool = client.connection_pool
        kwargs: dict[str, Any] = {**pool.connection_kwargs, "protocol": 3}
        waker = cls(pool.connection_class(**kwargs), _independent(prefixes))
        try:
            waker.connection.connect()  # type: ignore[no-untyped-call]
            waker.arm()
        except redis.exceptions.ResponseError as exc:
            waker.close()
            logger.info("Redis refused CLIENT TRACKING (%s): idle consumers poll instead", exc)
            return None
        except redis.exceptions.ConnectionError:
            waker.close()
            raise
        return waker

    def arm(self) -> None:
        """Turn the pushes on (one round trip); no-op when they are on."""
        if self.armed:
            return
        self._finish_disarm()
        command: list[str] = ["CLIENT", "TRACKING", "ON", "BCAST"]
        for prefix in self.prefixes:
            command += ["PREFIX", prefix]
        self.connection.send_command(*command)  # type: ignore[no-untyped-call]
        self.connection.read_response()
        self.armed = True

    def disarm(self) -> None:
        """Turn the pushes off while the consumer is busy, so none pile up in the server's
        output buffer for this connection; no-op when they are off.

        Only sends the command: its reply is read by the next ``arm``, ``pending`` or
        ``drain``. Profiling round trips showed the wait for that reply between a
        wake-up's claim and the task's start (the server turns the pushes off as soon
        as it reads the command all the same).
        """
        if not self.armed:
            return
        self.connection.send_command(  # type: ignore[no-untyped-call]
            "CLIENT", "TRACKING", "OFF")
        self.armed = False
        self._off_sent = True

    def _finish_disarm(self) -> None:
        if self._off_sent:
            self._off_sent = False
            self.connection.read_response()  # pushes read on the way are dropped
            self.drain()

    def pending(self) -> bool:
        """True when an invalidation is already buffered or readable."""
        self._finish_disarm()
        return bool(self.connection.can_read(timeout=0))

    def drain(self) -> bool:
        """Read every invalidation waiting now; True if there was any."""
        self._finish_disarm()
        woke = False
        while self.connection.can_read(timeout=0):
            self.connection.read_response(push_request=True)
            woke = True
        return woke

    def socket(self) -> socket.socket | None:
        return getattr(self.connection, "_sock", None)

    def close(self) -> None:
        self.connection.disconnect()  # type: ignore[no-untyped-call]


class IdleWait:
    """How an idle consumer waits for its lists: on a ``Waker``, or by polling.

    The waker is opened on the first wait and pushes are paused while the consumer is
    busy. Where Redis refuses one (or ``wake_ups`` is off) each wait is the polling
    back-off: ``interval_min`` doubled after each wait up to ``interval_max``, back to
    ``interval_min`` once messages come. Errors are translated here.

    Args:
        interval_min: the first polling interval (seconds).
        interval_max: the longest polling interval (seconds).
        wake_ups: whether to try a waker at all.
        longest: the longest wait on a waker (the caller has work to do between waits).
    """

    def __init__(self, interval_min: float, interval_max: float, *, wake_ups: bool,
                 longest: float) -> None:
        self.waker: Waker | None = None
        self._refused = not wake_ups
        self._interval_min = interval_min
        self._interval_max = interval_max
        self._interval = interval_min
        self._longest = longest

    def wait(self, client: redis.Redis, prefixes: Sequence[str],
             fanout: FanoutSubscriber | None, remaining: float | None) -> None:
        """Sleep until a list under ``prefixes`` or ``fanout`` may have something.

        With a waker the wait ends on a push from the server and lasts at most
        ``longest``; without one it is the polling back-off.
        """
        with translate_errors("waiting for messages"):
            waker = self.waker
            if waker is None and prefixes and not self._refused:
                self.waker = Waker.open(client, prefixes)
                self._refused = self.waker is None
                if self.waker is not None:
                    return  # take once more: something may have come before the pushes
            if waker is not None and not waker.armed:
                waker.arm()
                return  # likewise
            if waker is not None:
                wait = self._longest
            else:
                wait = self._interval
                self._interval = min(self._interval * 2, self._interval_max)
            if remaining is not None:
                wait = min(wait, remaining)
            if waker is None and fanout is None:
                time.sleep(wait)
                return
            ready = (waker is not None and waker.pending()) or (
                fanout is not None and fanout.pending())
            if not ready:
                wait_readable([waker.socket() if waker else None,
                               fanout.socket() if fanout else None], wait)
            if waker is not None:
                waker.drain()

    def busy(self) -> None:
        """Messages came: pause the pushes and start the polling back-off over."""
        if self.waker is not None and self.waker.armed:  # as pause(), one call less per poll
            with translate_errors("pausing wake-ups"):
                self.waker.disarm()
        self._interval = self._interval_min

    def pause(self) -> None:
        """Pause the pushes while the consumer does not wait (see ``Waker.disarm``)."""
        if self.waker is not None and self.waker.armed:
            with translate_errors("pausing wake-ups"):
                self.waker.disarm()

    def drop(self) -> None:
        """Close the waker; the next wait opens one for the queues consumed then."""
        waker, self.waker = self.waker, None
        if waker is not None:
            waker.close()


def wait_readable(sockets: Sequence[socket.socket | None], timeout: float) -> bool:
    """Wait up to ``timeout`` seconds until one of ``sockets`` is readable (or closed)."""
    live = [s for s in sockets if s is not None]
    if not live:
        return False
    readable, _, errored = select.select(live, [], live, max(timeout, 0.0))
    return bool(readable or errored)


def _independent(prefixes: Iterable[str]) -> list[str]:
    """``prefixes`` without those that start with another one (Redis refuses overlaps)."""
    kept: list[str] = []
    for prefix in sorted(set(prefixes)):
        if not any(prefix.startswith(other) for other in kept):
            kept.append(prefix)
    return kept
