"""``EventReceiver``: reads Celery events (taskframe's and Celery's workers' alike).

It consumes a queue of its own, ``celeryev.<uuid>``, bound to the events
exchange with ``#`` (every event) as Celery's receivers do: auto-deleted,
exclusive, messages expire after ``event_queue_ttl`` seconds and the queue
after ``event_queue_expires`` seconds unused. On Redis it is a PSUBSCRIBE to
``/{db}.celeryev/*``.

A message body is one event object or a list of them (Celery's batched
``task.multi``). Each event gets ``local_received`` (this host's time of
receipt), its ``timestamp`` moved into this host's frame using the sender's
``utcoffset``, and its ``clock`` merged into the receiver's Lamport clock
(``task-sent`` events come from clients, whose clocks never sync: they get
the receiver's clock minus one, as in Celery).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from taskframe.events.event import (
    EVENT_EXCHANGE,
    Clock,
    LamportClock,
    adjust_timestamp,
    event_exchange,
)
from taskframe.transport import Connection, Exchange, Message, Queue
from taskframe.transport.errors import SerializationError, TransportError
from taskframe.transport.serialization import MAX_BODY_SIZE

if TYPE_CHECKING:
    from taskframe.client.app import Taskframe

__all__ = ["EventReceiver", "Handler"]

logger = logging.getLogger("taskframe.events")

Handler = Callable[[dict[str, Any]], None]


class EventReceiver:
    """Receives events and calls ``handlers[type]`` (or ``handlers["*"]``) with each.

    Args:
        connection: a connection this receiver owns (used from one thread).
        handlers: event type -> callable; ``"*"`` catches the rest.
        routing_key: the binding key (``#`` all, ``worker.#`` worker events only).
        exchange: the events exchange (default: ``celeryev`` typed for the broker).
        queue_prefix: ``event_queue_prefix``; the queue is ``<prefix>.<node_id>``.
        node_id: default a new uuid.
        queue_ttl / queue_expires: seconds (``event_queue_ttl``, ``event_queue_expires``).
        exclusive / durable: queue flags (``event_queue_exclusive``, ``event_queue_durable``).
        accept: serializers accepted (default JSON only).
        clock: the Lamport clock to merge event clocks into.
        max_size: the most bytes an event message may have, as received or decompressed
            (``worker_max_message_size``; ``None``: no bound).
    """

    def __init__(
        self,
        connection: Connection,
        handlers: Mapping[str, Handler] | None = None,
        *,
        routing_key: str = "#",
        exchange: Exchange | None = None,
        queue_prefix: str = EVENT_EXCHANGE,
        node_id: str | None = None,
        queue_ttl: float | None = 5.0,
        queue_expires: float | None = 60.0,
        exclusive: bool = True,
        durable: bool = False,
        accept: Collection[str] | None = None,
        clock: Clock | None = None,
        max_size: int | None = MAX_BODY_SIZE,
    ) -> None:
        self.connection = connection
        self.handlers: dict[str, Handler] = dict(handlers or {})
        self.exchange = exchange or event_exchange(connection.url)
        self.node_id = node_id or str(uuid.uuid4())
        arguments: dict[str, Any] = {}
        if queue_ttl:
            arguments["x-message-ttl"] = int(queue_ttl * 1000)
        if queue_expires:
            arguments["x-expires"] = int(queue_expires * 1000)
        self.queue = Queue(
            f"{queue_prefix}.{self.node_id}", exchange=self.exchange, routing_key=routing_key,
            durable=durable, auto_delete=not durable, exclusive=exclusive and not durable,
            arguments=arguments,
        )
        self.accept = tuple(accept or ("json",))
        self.max_size = max_size
        self.clock: Clock = clock or LamportClock()
        self._consuming_on: object | None = None

    @classmethod
    def for_app(cls, app: Taskframe, handlers: Mapping[str, Handler] | None = None,
                **options: Any) -> EventReceiver:
        """A receiver on a new connection to ``app``'s broker, with its event settings."""
        conf = app.conf
        connection = app.connection(conf.broker_read_url or None)
        options.setdefault("exchange", event_exchange(connection.url,
                                                      conf.event_exchange or EVENT_EXCHANGE))
        options.setdefault("queue_prefix", conf.event_queue_prefix or EVENT_EXCHANGE)
        options.setdefault("queue_ttl", conf.event_queue_ttl)
        options.setdefault("queue_expires", conf.event_queue_expires)
        options.setdefault("exclusive", bool(conf.event_queue_exclusive))
        options.setdefault("durable", bool(conf.event_queue_durable))
        options.setdefault("accept", {conf.event_serializer or "json", "json"})
        options.setdefault("max_size", int(conf.worker_max_message_size or 0) or None)
        return cls(connection, handlers, **options)

    # -- receiving ----------------------------------------------------------------------

    def consume(self) -> None:
        """Connect (if needed), declare the queue and start receiving. Idempotent."""
        if not self.connection.connected:
            self.connection.close()
            self.connection.connect()
        transport = self.connection.transport
        if self._consuming_on is not transport:
            transport.declare_exchange(self.exchange)
            transport.consume([self.queue])
            self._consuming_on = transport

    def poll(self, timeout: float | None = 1.0) -> list[dict[str, Any]]:
        """Wait up to ``timeout`` seconds; return the events received, handled in order.

        Raises:
            ConnectionLost: the link dropped (``consume()`` again to resume).
        """
        self.consume()
        transport = self.connection.transport
        messages = transport.poll(timeout)
        events: list[dict[str, Any]] = []
        for message in messages:
            events += self._events_of(message)
        if messages:
            transport.ack_many(messages)
        for event in events:
            self.process(event)
        return events

    def itercapture(self, limit: int | None = None,
                    timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Yield events as they come: stop after ``limit`` events or ``timeout`` seconds.

        A dropped connection is reconnected (events sent meanwhile are lost: the
        queue is gone with its connection).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        count = 0
        while limit is None or count < limit:
            wait = 1.0 if deadline is None else deadline - time.monotonic()
            if wait <= 0:
                return
            try:
                events = self.poll(min(wait, 1.0))
            except TransportError as exc:
                logger.warning("events: receiving failed (%s); reconnecting", exc)
                self.connection.close()
                self._consuming_on = None
                time.sleep(min(1.0, max(wait, 0.0)))
                continue
            for event in events:
                yield event
                count += 1
                if limit is not None and count >= limit:
                    return

    def capture(self, limit: int | None = None, timeout: float | None = None) -> int:
        """Receive (calling the handlers) until ``limit`` events or ``timeout``; return count."""
        return sum(1 for _ in self.itercapture(limit, timeout))

    def process(self, event: dict[str, Any]) -> None:
        """Call the handler for ``event["type"]`` (or ``"*"``); errors are logged."""
        handler = self.handlers.get(event.get("type", "")) or self.handlers.get("*")
        if handler is None:
            return
        try:
            handler(event)
        except Exception:
            logger.exception("events: handler for %s raised", event.get("type"))

    def _events_of(self, message: Message) -> list[dict[str, Any]]:
        try:
            body = message.decode(self.accept, self.max_size)
        except SerializationError as exc:
            logger.warning("events: unreadable event message (%s)", exc)
            return []
        items = body if isinstance(body, list) else [body]
        return [self.localize(item) for item in items if isinstance(item, dict) and "type" in item]

    def localize(self, event: dict[str, Any], now: float | None = None) -> dict[str, Any]:
        """Merge the event's clock, move its timestamp to this host, add ``local_received``."""
        if event["type"] == "task-sent":
            event["clock"] = (self.clock.value or 1) - 1
            self.clock.adjust(event["clock"])
        elif isinstance(event.get("clock"), int):
            self.clock.adjust(event["clock"])
        else:
            event["clock"] = self.clock.forward()
        offset, timestamp = event.get("utcoffset"), event.get("timestamp")
        if isinstance(offset, int | float) and isinstance(timestamp, int | float):
            event["timestamp"] = adjust_timestamp(float(timestamp), float(offset))
        event["local_received"] = time.time() if now is None else now
        return event

    def close(self) -> None:
        """Stop receiving and disconnect (the queue goes away with the connection)."""
        self._consuming_on = None
        self.connection.close()

    def __enter__(self) -> EventReceiver:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
