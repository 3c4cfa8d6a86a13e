"""``EventDispatcher``: sends Celery events on a connection of its own, from one thread.

``send()`` is cheap and safe from any thread (pool threads, signal receivers):
it stamps the event (clock, timestamp, pid) and puts it on a queue. One sender
thread owns the dispatcher's broker connection (py-amqp channels are not
thread-safe, and the worker's consuming connection belongs to its loop) and
publishes what is queued. Events of the buffered groups (``task`` by default)
that arrive together are sent as one message: a JSON list with routing key
``task.multi``, at most ``buffer_limit`` events each, as Celery's workers do.

Events are best effort, as in Celery: while the broker is unreachable they are
kept (up to ``max_pending``), the sender retries every few seconds, and a
publish nobody is bound to receive (no monitor running) is dropped quietly.

After ``os.fork()`` the child gets a fresh queue, thread and connection on its
first ``send()``; the parent's socket is never touched from the child.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any
from weakref import WeakSet

from taskframe.events.event import (
    EVENT_EXCHANGE,
    Clock,
    LamportClock,
    event_exchange,
    group_of,
    make_event,
    routing_key_for,
)
from taskframe.transport import Connection, Exchange, Transport
from taskframe.transport.errors import (
    ConnectionLost,
    PublishError,
    SerializationError,
    TransportError,
)
from taskframe.transport.producer import envelope_of, publish_on

if TYPE_CHECKING:
    from taskframe.client.app import Taskframe

__all__ = ["EventDispatcher", "events_supported"]

logger = logging.getLogger("taskframe.events")

# Brokers whose events reach Celery's monitors (Celery disables events on SQL).
_SUPPORTED_SCHEMES = ("amqp", "amqps", "pyamqp", "redis", "rediss", "redis+socket", "sentinel")

_RETRY_EVERY = 2.0  # seconds between reconnection attempts while the broker is away
_STOP = object()

_live: WeakSet[EventDispatcher] = WeakSet()


def events_supported(broker_url: str) -> bool:
    """True when events can be sent over this broker (AMQP and Redis)."""
    return broker_url.split("://", 1)[0].lower() in _SUPPORTED_SCHEMES


class _Flush:
    """A marker on the queue: set ``done`` once everything queued before it was handled."""

    def __init__(self) -> None:
        self.done = threading.Event()


class EventDispatcher:
    """Publishes events as ``hostname``.

    Args:
        connection: a connection this dispatcher owns (connected by the sender thread).
        hostname: the sender's node name (``w1@host``, or ``gen<pid>@host`` for clients).
        exchange: the events exchange (default: ``celeryev`` typed for the broker).
        serializer: ``event_serializer``.
        enabled: ``False`` makes ``send`` a no-op until ``enable()``.
        groups: only these groups (``{"worker"}``, ``{"task", "worker"}``) are sent;
            ``None`` sends every group.
        buffer_groups: groups whose events are batched into ``<group>.multi`` lists.
        buffer_limit: most events in one batch.
        linger: seconds the sender waits for more events to batch with the first.
        max_pending: most events kept while the broker is unreachable (oldest dropped).
        clock: the Lamport clock to stamp events with.
    """

    def __init__(
        self,
        connection: Connection,
        hostname: str,
        *,
        exchange: Exchange | None = None,
        serializer: str = "json",
        enabled: bool = True,
        groups: Iterable[str] | None = None,
        buffer_groups: Iterable[str] = ("task",),
        buffer_limit: int = 24,
        linger: float = 0.05,
        max_pending: int = 10_000,
        clock: Clock | None = None,
    ) -> None:
        self.connection = connection
        self.hostname = hostname
        self.exchange = exchange or event_exchange(connection.url)
        self.serializer = serializer
        self.enabled = enabled
        self.groups: set[str] | None = None if groups is None else set(groups)
        self.buffer_groups = frozenset(buffer_groups)
        self.buffer_limit = max(1, buffer_limit)
        self.linger = linger
        self.clock: Clock = clock or LamportClock()
        self.headers = {"hostname": hostname}
        self.sent = 0  # messages published (a batch counts once)
        self._pending: collections.deque[tuple[str, Any]] = collections.deque(maxlen=max_pending)
        self._lock = threading.Lock()
        self._reset()
        _live.add(self)

    @classmethod
    def for_app(cls, app: Taskframe, hostname: str, **options: Any) -> EventDispatcher:
        """A dispatcher on a new connection to ``app``'s broker, with its event settings."""
        conf = app.conf
        # Publishing only, from a thread that sleeps between events: no heartbeat.
        connection = app.connection(conf.broker_write_url or None, heartbeat=0)
        options.setdefault("exchange", event_exchange(connection.url,
                                                      conf.event_exchange or EVENT_EXCHANGE))
        options.setdefault("serializer", conf.event_serializer or "json")
        return cls(connection, hostname, **options)

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._failing_since: float | None = None

    # -- sending (any thread) ---------------------------------------------------------

    def wants(self, event_type: str) -> bool:
        """True when an event of this type would be sent now."""
        return self.enabled and not self._closed and (
            self.groups is None or group_of(event_type) in self.groups)

    def send(self, event_type: str, **fields: Any) -> dict[str, Any] | None:
        """Queue one event (stamped now); return it, or ``None`` when not sent.

        Fields must be serializable by ``serializer``. Never blocks on the broker.
        """
        if not self.wants(event_type):
            return None
        event = make_event(event_type, hostname=self.hostname, clock=self.clock.forward(),
                           **fields)
        self._queue.put(event)
        self._ensure_thread()
        return event

    def flush(self, timeout: float | None = 5.0) -> bool:
        """Wait until everything queued so far was handed to the broker (or given up on)."""
        if self._thread is None or not self._thread.is_alive():
            return True
        marker = _Flush()
        self._queue.put(marker)
        return marker.done.wait(timeout)

    def enable(self) -> None:
        """Send events from now on."""
        self.enabled = True

    def disable(self) -> None:
        """Drop events from now on (``send`` returns ``None``)."""
        self.enabled = False

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (waiting at most ``timeout``), stop the thread, disconnect."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._failing_since is not None:
            timeout = min(timeout, 0.5)  # the broker is away: do not hold up the caller
        thread = self._thread
        if thread is not None and thread.is_alive() and self._pid == os.getpid():
            self._queue.put(_STOP)
            thread.join(timeout)
            if thread.is_alive():
                logger.warning("events: gave up sending %d queued event(s) at close",
                               self._queue.qsize())
        if self._pid == os.getpid():
            self.connection.close()
        _live.discard(self)

    def _after_fork(self) -> None:
        """In a forked child: start afresh (called with only this thread running)."""
        if self._pid == os.getpid():
            return
        # The parent's transport (and its socket) must not be used nor closed here, and
        # its lock may have been held by a thread that does not exist in the child.
        self._lock = threading.Lock()
        old = self.connection
        self.connection = Connection(old.urls, transport_options=old.transport_options,
                                     connect_timeout=old.connect_timeout)
        self._pending.clear()
        self._reset()

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._closed or (self._thread is not None and self._thread.is_alive()):
                return
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name=f"taskframe-events-{self.hostname}")
            self._thread.start()

    # -- the sender thread --------------------------------------------------------------

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get() if not self._pending else self._get(_RETRY_EVERY)
            items = [] if first is None else [first]
            items += self._gather(first)
            flushes: list[_Flush] = []
            for item in items:
                if item is _STOP:
                    stop = True
                elif isinstance(item, _Flush):
                    flushes.append(item)
                else:
                    self._pending.append((routing_key_for(item["type"]), item))
            try:
                self._publish_pending(give_up=stop)
            except Exception:  # never let a bug end the thread: events would stop silently
                logger.exception("events: sending failed")
                self._pending.clear()
            for marker in flushes:
                marker.done.set()
        self._disconnect()

    def _get(self, timeout: float) -> Any:
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _gather(self, first: Any) -> list[Any]:
        """Take what else is queued; wait ``linger`` for more when batching pays."""
        gathered: list[Any] = []
        deadline = time.monotonic() + self.linger
        batching = isinstance(first, dict) and group_of(first["type"]) in self.buffer_groups
        while len(gathered) < self.buffer_limit * 4:
            wait = deadline - time.monotonic() if batching else 0.0
            try:
                item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            gathered.append(item)
            if item is _STOP or isinstance(item, _Flush):
                break
        return gathered

    def _batches(self, items: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        """Merge runs of buffered-group events into ``<group>.multi`` lists."""
        out: list[tuple[str, Any]] = []
        run: list[dict[str, Any]] = []
        run_group = ""

        def close_run() -> None:
            if len(run) == 1:
                out.append((routing_key_for(run[0]["type"]), run[0]))
            elif run:
                out.append((f"{run_group}.multi", list(run)))
            run.clear()

        for routing_key, body in items:
            group = group_of(body["type"]) if isinstance(body, dict) else ""
            if group in self.buffer_groups:
                if run and (group != run_group or len(run) >= self.buffer_limit):
                    close_run()
                run_group = group
                run.append(body)
            else:
                close_run()
                out.append((routing_key, body))
        close_run()
        return out

    def _publish_pending(self, *, give_up: bool) -> None:
        if not self._pending:
            return
        if (self._failing_since is not None and not give_up
                and time.monotonic() - self._failing_since < _RETRY_EVERY):
            return
        messages = self._batches(list(self._pending))
        self._pending.clear()
        for index, (routing_key, body) in enumerate(messages):
            try:
                self._publish(routing_key, body)
            except TransportError as exc:
                self._on_error(exc)
                if not give_up:
                    for _, rest in messages[index:]:
                        for event in rest if isinstance(rest, list) else [rest]:
                            self._pending.append((routing_key_for(event["type"]), event))
                return
        if self._failing_since is not None:
            logger.info("events: sending again to %s", self.connection.safe_url())
        self._failing_since = None

    def _publish(self, routing_key: str, body: Any) -> None:
        try:
            envelope = envelope_of(body, serializer=self.serializer, headers=self.headers,
                                   properties={"delivery_mode": 1})
        except SerializationError as exc:
            logger.error("events: dropped an event that cannot be serialized: %s", exc)
            return
        try:
            try:
                publish_on(self._transport(), envelope, exchange=self.exchange.name,
                           routing_key=routing_key)
            except ConnectionLost:
                # An idle link the broker dropped (missed heartbeats): reconnect once now.
                self.connection.close()
                publish_on(self._transport(), envelope, exchange=self.exchange.name,
                           routing_key=routing_key)
        except PublishError as exc:
            # Nobody bound (no monitor running): AMQP returns the message. Not an error.
            logger.debug("events: %s not delivered: %s", routing_key, exc)
        self.sent += 1

    def _transport(self) -> Transport:
        if not self.connection.connected:
            self.connection.close()
            self.connection.connect()
            self.connection.transport.declare_exchange(self.exchange)
        return self.connection.transport

    def _on_error(self, exc: TransportError) -> None:
        if self._failing_since is None:
            logger.warning("events: cannot send to %s (%s); retrying every %.0f s",
                           self.connection.safe_url(), exc, _RETRY_EVERY)
        self._failing_since = time.monotonic()
        self.connection.close()

    def _disconnect(self) -> None:
        try:
            self.connection.close()
        except TransportError as exc:  # pragma: no cover - close already logs and swallows
            logger.debug("events: closing: %s", exc)


def _after_fork_in_child() -> None:
    for dispatcher in list(_live):
        dispatcher._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
