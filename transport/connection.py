"""The front door: ``Connection`` and ``Consumer``, as in kombu (``Producer``: ``producer``).

``Connection`` picks the transport class from the URL scheme (a plain dict of
loader functions: a transport's client library is imported only when a URL
uses it), connects with retries and exponential backoff, rotates through
failover URLs and re-runs operations whose connection dropped. A
``Connection`` and its transport are used from one thread at a time: give each
thread its own.

Backoff: after each full round of failed attempts over the failover URLs the
caller sleeps ``min(interval_max, interval_start + interval_step * (2**n - 1))``
for round ``n`` (0, 1, ...), with "equal jitter": a random time between half
that and all of it, so that many workers restarting together spread out.
Moving on to the next failover URL within a round happens at once.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

from .base import Message, Transport
from .entities import Queue
from .errors import BrokerConnectionError, ImproperlyConfigured, TransportError
from .url import parse_url, safe_url, split_failover

__all__ = ["Connection", "Consumer", "known_schemes", "transport_class"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Celery's default publish retry policy (task_publish_retry_policy).
_DEFAULT_RETRY_POLICY: dict[str, Any] = {
    "max_retries": 3,
    "interval_start": 0.0,
    "interval_step": 0.2,
    "interval_max": 1.0,
}
_RECONNECT_KEYS = ("max_retries", "interval_start", "interval_step", "interval_max", "on_error")


def _load_memory() -> type[Transport]:
    from .memory import MemoryTransport

    return MemoryTransport


def _load_sql() -> type[Transport]:
    try:
        from .sql import SQLTransport
    except ImportError as exc:
        raise ImproperlyConfigured(f"the SQL transport needs SQLAlchemy 2: {exc}") from exc
    return SQLTransport


def _load_amqp() -> type[Transport]:
    try:
        from .amqp import AMQPTransport
    except ImportError as exc:
        raise ImproperlyConfigured(f"the AMQP transport needs py-amqp 5 (amqp): {exc}") from exc
    return AMQPTransport


def _load_redis() -> type[Transport]:
    try:
        from .redis import RedisTransport
    except ImportError as exc:
        raise ImproperlyConfigured(f"the Redis transport needs redis-py (redis): {exc}") from exc
    return RedisTransport


# Scheme (the whole scheme first, else the part before "+") -> loader.
_LOADERS: dict[str, Callable[[], type[Transport]]] = {
    "amqp": _load_amqp,
    "amqps": _load_amqp,
    "pyamqp": _load_amqp,
    "memory": _load_memory,
    "redis": _load_redis,
    "rediss": _load_redis,
    "redis+socket": _load_redis,
    "sentinel": _load_redis,
    "sqlite": _load_sql,
    "sqla": _load_sql,
}


def known_schemes() -> list[str]:
    """The URL schemes a ``Connection`` understands."""
    return sorted(_LOADERS)


def _loader(url: str) -> Callable[[], type[Transport]]:
    parsed = parse_url(url)
    loader = _LOADERS.get(parsed.scheme) or _LOADERS.get(parsed.transport)
    if loader is None:
        raise ImproperlyConfigured(
            f"unknown broker scheme {parsed.scheme!r} in {parsed.safe_url()} "
            f"(known: {', '.join(known_schemes())})"
        )
    return loader


def transport_class(url: str) -> type[Transport]:
    """The transport class serving ``url`` (imports its module on first use).

    Raises:
        ImproperlyConfigured: unknown scheme or missing client library.
    """
    return _loader(url)()


def backoff_interval(
    round_number: int, interval_start: float, interval_step: float, interval_max: float
) -> float:
    """The jittered sleep after failed round ``round_number`` (see the module docstring)."""
    growth = 2 ** min(round_number, 30) - 1
    base = max(0.0, min(interval_max, interval_start + interval_step * growth))
    return random.uniform(base / 2, base)


class Connection:
    """A connection to a broker, with failover URLs and retries.

    Args:
        url: one URL, ``"url1;url2"`` or a list of URLs (failover alternatives).
        transport_options: passed to the transport (``broker_transport_options``).
        connect_timeout: seconds one connection attempt may take.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        transport_options: Mapping[str, Any] | None = None,
        connect_timeout: float = 4.0,
    ) -> None:
        self.urls = split_failover(url)
        for each in self.urls:
            _loader(each)  # fail early on an unknown scheme
        self.transport_options = dict(transport_options or {})
        self.connect_timeout = connect_timeout
        self._index = 0
        self._transport: Transport | None = None

    @property
    def url(self) -> str:
        """The URL in use now (holds the password: log ``safe_url()`` instead)."""
        return self.urls[self._index]

    def safe_url(self) -> str:
        """The URL in use now with its password masked."""
        return safe_url(self.url)

    @property
    def transport(self) -> Transport:
        """The transport for the current URL (created on first use, not connected)."""
        if self._transport is None:
            options = {"connect_timeout": self.connect_timeout, **self.transport_options}
            self._transport = transport_class(self.url)(self.url, options)
        return self._transport

    @property
    def connected(self) -> bool:
        """True while the transport is connected."""
        return self._transport is not None and self._transport.connected

    def connect(self) -> Connection:
        """Connect once, without retries.

        Raises:
            BrokerConnectionError: the broker cannot be reached.
        """
        self.transport.connect()
        return self

    def close(self) -> None:
        """Close the transport (held messages go back to their queues). Idempotent."""
        transport, self._transport = self._transport, None
        if transport is not None:
            try:
                transport.close()
            except TransportError as exc:
                logger.warning("closing %s: %s", self.safe_url(), exc)

    def _switch_url(self) -> None:
        transport = self._transport
        if len(self.urls) == 1 and transport is not None and transport.keeps_deliveries:
            transport.drop()  # the same broker: keep what the transport holds
            return
        self.close()
        self._index = (self._index + 1) % len(self.urls)

    def reconnect(self, **policy: Any) -> bool:
        """After the link failed: connect again (``ensure_connection(**policy)``).

        Returns:
            True when the messages held before are still held and can be settled: the
            transport keeps deliveries across links (``Transport.keeps_deliveries``) and
            the broker is the same (no failover to another URL). False when they are
            not (AMQP: the broker gives them back by itself).
        """
        transport = self._transport
        keeps = transport is not None and transport.keeps_deliveries
        if transport is not None and keeps:
            transport.drop()
        else:
            self.close()
        self.ensure_connection(**policy)
        return keeps and self._transport is transport

    def ensure_connection(
        self,
        max_retries: int | None = None,
        interval_start: float = 2.0,
        interval_step: float = 2.0,
        interval_max: float = 30.0,
        on_error: Callable[[Exception, float], None] | None = None,
    ) -> Connection:
        """Connect, retrying with backoff and rotating through the failover URLs.

        Args:
            max_retries: attempts after the first; ``None`` retries forever.
            interval_start / interval_step / interval_max: the backoff (see the module
                docstring).
            on_error: called with the error and the seconds about to be slept before
                each retry.

        Raises:
            BrokerConnectionError: still unreachable after ``max_retries`` retries.
        """
        retries = 0
        round_number = 0
        failed_in_round = 0
        while True:
            try:
                self.transport.connect()
                return self
            except BrokerConnectionError as exc:
                if max_retries is not None and retries >= max_retries:
                    self.close()
                    raise BrokerConnectionError(
                        f"cannot connect to {self.safe_url()} after {retries + 1} attempt(s): "
                        f"{exc}"
                    ) from exc
                retries += 1
                failed_in_round += 1
                interval = 0.0
                if failed_in_round >= len(self.urls):
                    interval = backoff_interval(
                        round_number, interval_start, interval_step, interval_max
                    )
                    round_number += 1
                    failed_in_round = 0
                logger.warning("cannot connect to %s: %s", self.safe_url(), exc)
                if on_error is not None:
                    on_error(exc, interval)
                self._switch_url()
                if interval > 0:
                    time.sleep(interval)

    def ensure(
        self, fn: Callable[[Transport], T], retry_policy: Mapping[str, Any] | None = None
    ) -> T:
        """Run ``fn(transport)``; when the connection drops, reconnect and run it again.

        ``retry_policy`` takes the keys of ``ensure_connection`` (Celery's
        ``task_publish_retry_policy``); it bounds both the re-runs of ``fn`` and
        each reconnection. A re-run publish may deliver a message twice.

        Raises:
            BrokerConnectionError: the last error once ``max_retries`` re-runs failed.
        """
        policy = {**_DEFAULT_RETRY_POLICY, **(retry_policy or {})}
        max_retries = policy["max_retries"]
        reconnect = {key: policy[key] for key in _RECONNECT_KEYS if key in policy}
        if not self.connected:
            self.ensure_connection(**reconnect)
        retries = 0
        while True:
            try:
                return fn(self.transport)
            except BrokerConnectionError as exc:
                if max_retries is not None and retries >= max_retries:
                    raise
                interval = backoff_interval(
                    retries, policy["interval_start"], policy["interval_step"],
                    policy["interval_max"],
                )
                retries += 1
                logger.warning("connection to %s lost (%s); retrying", self.safe_url(), exc)
                on_error = policy.get("on_error")
                if on_error is not None:
                    on_error(exc, interval)
                self.close()
                time.sleep(interval)
                self.ensure_connection(**reconnect)

    def __enter__(self) -> Connection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Connection {self.safe_url()}>"


class Consumer:
    """Receives messages from ``queues`` and hands each to ``on_message``.

    After the connection reconnects (a new transport), the next ``drain_events``
    consumes again by itself.

    Args:
        connection: where to consume.
        queues: the queues to consume from (declared by ``consume()``).
        on_message: called with each received ``Message``; it must ack or reject it.
        prefetch_count: most unacknowledged messages held at once (0: no bound).
    """

    def __init__(
        self,
        connection: Connection,
        queues: Sequence[Queue],
        on_message: Callable[[Message], None],
        prefetch_count: int = 0,
    ) -> None:
        self.connection = connection
        self.queues = list(queues)
        self.on_message = on_message
        self.prefetch_count = prefetch_count
        self._active = False
        self._consuming_on: Transport | None = None

    def consume(self) -> None:
        """Declare the queues and start receiving (connects if needed)."""
        if not self.connection.connected:
            self.connection.connect()
        transport = self.connection.transport
        transport.consume(self.queues, prefetch_count=self.prefetch_count)
        self._consuming_on = transport
        self._active = True

    def qos(self, prefetch_count: int) -> None:
        """Change the prefetch bound (0: none)."""
        self.prefetch_count = prefetch_count
        if self._consuming_on is not None:
            self._consuming_on.set_prefetch(prefetch_count)

    def drain_events(self, timeout: float | None = None) -> int:
        """Wait up to ``timeout`` seconds, pass received messages to ``on_message``.

        Returns:
            How many messages were handled (0 when none came in time).

        Raises:
            ConnectionLost: the connection dropped (call ``connection.ensure_connection``).
        """
        if self._active and self.connection.transport is not self._consuming_on:
            self.consume()
        messages = self.connection.transport.poll(timeout)
        for message in messages:
            self.on_message(message)
        return len(messages)

    def cancel(self) -> None:
        """Stop receiving; messages already held stay held until settled."""
        self._active = False
        transport, self._consuming_on = self._consuming_on, None
        if transport is not None and transport.connected:
            for queue in self.queues:
                with contextlib.suppress(TransportError):
                    transport.cancel(queue.name)

    def __enter__(self) -> Consumer:
        self.consume()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cancel()
