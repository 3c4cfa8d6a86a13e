"""The RabbitMQ transport, on py-amqp.

Features:
    * Publisher confirms on every publish: ``publish`` returns once RabbitMQ
      holds the message. Messages are persistent (``delivery_mode`` 2) unless
      the envelope says otherwise, and published ``mandatory``: an unroutable
      message (``basic.return``) or a negative confirm raises ``PublishError``.
    * Exchanges (direct, topic, fanout, headers) and queues: classic or quorum
      (``x-queue-type``), priorities on classic queues (``x-max-priority``;
      ignored with a warning on quorum queues, which reject it), extra
      ``arguments`` passed through. The default exchange ``""`` is never
      declared. Declarations are made once per connection and again after a
      reconnect (a new connection). A queue redeclared with other arguments
      raises ``TransportError`` with RabbitMQ's reply (PRECONDITION_FAILED).
    * Consuming: one ``basic_consume`` per queue with manual acks, QoS always
      per consumer (``basic_qos(0, n, global=False)``: quorum queues and
      RabbitMQ 4 refuse global QoS). RabbitMQ applies a new per-consumer
      prefetch only to consumers started after it, so ``set_prefetch`` sends
      ``basic_qos`` and restarts the consumers (held messages stay held). With
      several queues the broker bound is per queue; ``poll`` still never
      returns more than the prefetch bound across the transport (the rest waits,
      unacknowledged, in a local buffer).
    * Heartbeats (``heartbeat`` seconds, 0 = off) are serviced in ``maintain()``
      and while polling. A dropped link, a missed heartbeat or a forced close
      (``rabbitmqctl close_all_connections``) raises ``ConnectionLost``; the
      caller reconnects, and RabbitMQ gives unacknowledged messages back.
    * Native delayed delivery with Celery 5.5+'s topology (see
      ``amqp_delayed``), so Celery and taskframe workers run each other's
      delayed tasks. ``publish(delay=d)`` routes through the ladder when the
      destination allows it (below); the whole seconds of ``d`` are waited in the
      broker and the message keeps its ``eta`` header for the rest. Delays under
      1 s are published at once (the worker's timer holds them). Delays over
      ``2**28 - 1`` s (about 8.5 years) raise ``PublishError``. ``x-death``
      headers are stripped on every publish (RabbitMQ < 4.0.1 drops messages
      whose dead-letter history looks like a cycle) and a delay prefix already
      on a routing key is replaced, never stacked, so keys stay under 255 bytes.

Which destinations are delayed in the broker (option ``delayed_delivery``):
    ``"auto"`` (default): queues declared as quorum on this connection, as Celery
    does. ``True``: every queue declared on this connection, classic ones too,
    and any queue named through the default exchange. ``False``: none. Through
    a named exchange, a delay is used only when a declared delayable queue's
    binding matches the routing key (the final hop is then bound for every queue
    declared on that exchange); a delayed message nobody is bound for would be
    dropped at the end of the ladder, where no publisher hears of it. A delayed
    publish anywhere else is published at once and the consuming worker holds it
    until due. ``supports_delay`` is a property here, not a class-wide flag: it
    is True only when every queue declared on this connection can be delayed
    (with ``"auto"``: all are quorum), so a worker that consumes a classic queue
    keeps far ETAs itself instead of handing them back to a broker that would
    deliver them straight away. ``can_delay(exchange, routing_key)`` answers
    for one destination.

URLs:
    ``amqp://user:password@host:port/vhost`` (defaults ``guest``/``guest``,
    ``localhost``, 5672, vhost ``/``; ``amqp://host//`` and ``amqp://host/``
    both name vhost ``/``), ``amqps://...`` (TLS, port 5671), ``pyamqp://``
    (kombu's name, same as ``amqp://``). Query options ``heartbeat``,
    ``connect_timeout`` and ``confirm_timeout`` override the transport options.

Options (``transport_options``):
    ``connect_timeout`` (4.0 s), ``heartbeat`` (60.0 s, 0 = off), ``ssl``
    (``True``, a dict of ``ssl.wrap_socket``-style options or an
    ``ssl.SSLContext``; implied by ``amqps://``), ``delayed_delivery``
    (``"auto"``/``True``/``False``), ``delayed_delivery_queue_type``
    (``"quorum"``: the level queues' type, Celery's
    ``broker_native_delayed_delivery_queue_type``), ``confirm_timeout`` (30.0 s:
    how long a publish waits for its confirm before the link counts as lost),
    ``max_batch`` (200: most messages one ``poll`` returns when there is no
    prefetch bound), ``client_name`` (shown by ``rabbitmqctl list_connections``).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import amqp
from amqp import exceptions as amqp_errors

from . import amqp_delayed as ndd
from .amqp_io import may_have_frames, read_ahead
from .amqp_messages import describe_error, from_amqp, to_amqp
from .base import Envelope, Message, MessageState, Transport
from .entities import Exchange, Queue
from .errors import (
    BrokerConnectionError,
    ConnectionLost,
    ImproperlyConfigured,
    MessageStateError,
    PublishError,
    TransportError,
)
from .routing import topic_matches
from .url import parse_url

__all__ = ["AMQPTransport"]

logger = logging.getLogger(__name__)


# -- broker constants ----------------------------------------------------------------------
DEFAULT_PORT = 5672
DEFAULT_TLS_PORT = 5671
DEFAULT_USER = "guest"
DEFAULT_PASSWORD = "guest"
DEFAULT_VHOST = "/"
DEFAULT_HEARTBEAT = 60.0
DEFAULT_CONNECT_TIMEOUT = 4.0
DEFAULT_CONFIRM_TIMEOUT = 30.0
DEFAULT_MAX_BATCH = 200
MAX_PREFETCH = 65535  # basic.qos prefetch_count is a 16-bit field
MAX_SHORTSTR = 255  # exchange names and routing keys are AMQP short strings
QUEUE_TYPE_ARG = "x-queue-type"
MAX_PRIORITY_ARG = "x-max-priority"
_URL_OPTIONS = frozenset({"heartbeat", "connect_timeout", "confirm_timeout"})
# poll() waits in slices this long at most, so heartbeats are serviced meanwhile.
# A quarter of the heartbeat keeps two beats inside RabbitMQ's two-interval allowance.
_WAIT_SLICE = 1.0
# While the prefetch bound is reached, poll() waits this long at most.
_FULL_WAIT = 0.05

# py-amqp's connection-level failures: the link is gone (or unusable).
_LINK_ERRORS: tuple[type[BaseException], ...] = (
    amqp_errors.ConnectionError,
    OSError,
    AttributeError,  # py-amqp touching a channel whose connection was torn down
    IndexError,  # py-amqp's frame reader on a truncated stream
)


class AMQPTransport(Transport):
    """A transport on RabbitMQ through py-amqp (see the module docstring)."""

    schemes: ClassVar[tuple[str, ...]] = ("amqp", "amqps", "pyamqp")
    supports_fanout: ClassVar[bool] = True
    default_port: ClassVar[int | None] = DEFAULT_PORT

    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(url, options)
        parsed = parse_url(url)
        # URL query options (?heartbeat=30&connect_timeout=10) are the most specific.
        opts = {**self.options, **{k: v for k, v in parsed.query.items() if k in _URL_OPTIONS}}
        tls = parsed.scheme == "amqps"
        self._host = parsed.host or "localhost"
        self._port = parsed.port or (DEFAULT_TLS_PORT if tls else DEFAULT_PORT)
        self._user = parsed.user or DEFAULT_USER
        self._password = parsed.password if parsed.password is not None else DEFAULT_PASSWORD
        self._vhost = parsed.virtual_host or DEFAULT_VHOST
        self._ssl: Any = opts.get("ssl", tls) or tls
        self._connect_timeout = float(opts.get("connect_timeout", DEFAULT_CONNECT_TIMEOUT))
        self._heartbeat = float(opts.get("heartbeat", DEFAULT_HEARTBEAT) or 0)
        self._slice = min(_WAIT_SLICE, self._heartbeat / 4) if self._heartbeat else _WAIT_SLICE
        self._confirm_timeout = float(opts.get("confirm_timeout", DEFAULT_CONFIRM_TIMEOUT))
        self._max_batch = int(opts.get("max_batch", DEFAULT_MAX_BATCH))
        self._client_name = str(opts.get("client_name", "taskframe"))
        mode = opts.get("delayed_delivery", "auto")
        if mode not in ("auto", True, False):
            raise ImproperlyConfigured(
                f"delayed_delivery must be 'auto', True or False, not {mode!r}"
            )
        self._delay_mode: str | bool = mode
        self._level_queue_type = str(
            opts.get("delayed_delivery_queue_type", ndd.DEFAULT_LEVEL_QUEUE_TYPE)
        )
        if self._level_queue_type not in ("classic", "quorum"):
            raise ImproperlyConfigured("delayed_delivery_queue_type must be classic or quorum")
        self._conn: Any = None
        self._pub: Any = None  # declarations and publishing, confirm mode
        self._sub: Any = None  # consumers, QoS, acks
        self._reset_state()

    def _reset_state(self) -> None:
        self._queues: dict[str, Queue] = {}
        self._exchanges: set[str] = set()
        self._ndd_ready = False
        self._ndd_bound: set[tuple[str, str, str, str]] = set()
        self._consumers: dict[str, str] = {}  # queue name -> consumer tag
        self._tag_queue: dict[str, str] = {}  # consumer tag -> queue name
        self._consumed: dict[str, Queue] = {}
        self._prefetch = 0
        self._buffer: collections.deque[Message] = collections.deque()
        self._held: dict[int, Message] = {}
        self._returned: list[tuple[Any, str, str]] = []
        self._last_tick = 0.0

    def __repr__(self) -> str:
        scheme = "amqps" if self._ssl else "amqp"
        return f"<AMQPTransport {scheme}://{self._user}@{self._host}:{self._port}/{self._vhost}>"

    # -- connection -------------------------------------------------------------------

    def connect(self) -> None:
        if self._conn is not None:
            return
        self._reset_state()
        conn = amqp.Connection(
            host=f"{self._host}:{self._port}",
            userid=self._user,
            password=self._password,
            virtual_host=self._vhost,
            ssl=self._ssl,
            connect_timeout=self._connect_timeout,
            heartbeat=self._heartbeat,
            client_properties={"connection_name": self._client_name},
        )
        try:
            conn.connect()
            self._pub = conn.channel()
            self._pub.confirm_select()
            self._pub.events["basic_return"].add(self._on_return)
            self._sub = conn.channel()
        except (amqp_errors.AMQPError, *_LINK_ERRORS) as exc:
            with contextlib.suppress(Exception):
                conn.collect()
            self._pub = self._sub = None
            raise BrokerConnectionError(
                f"cannot connect to {self!r}: {describe_error(exc)}"
            ) from exc
        self._conn = conn
        if not self._ssl:
            read_ahead(conn)
        self._last_tick = time.monotonic()
        beat = float(conn.heartbeat or 0)  # as negotiated with the broker
        self._slice = min(_WAIT_SLICE, beat / 4) if beat else _WAIT_SLICE

    def close(self) -> None:
        conn, self._conn = self._conn, None
        self._pub = self._sub = None
        self._buffer.clear()
        self._held.clear()
        if conn is None:
            return
        try:
            conn.close()
        except (amqp_errors.AMQPError, *_LINK_ERRORS) as exc:
            logger.debug("%r: error while closing: %s", self, describe_error(exc))
            with contextlib.suppress(Exception):
                conn.collect()

    @property
    def connected(self) -> bool:
        return self._conn is not None and bool(self._conn.connected)

    def _require(self) -> Any:
        if self._conn is None:
            raise BrokerConnectionError(f"{self!r} is not connected")
        return self._conn

    def _abandon(self) -> None:
        """Drop a broken link without the closing handshake."""
        conn, self._conn = self._conn, None
        self._pub = self._sub = None
        self._buffer.clear()
        self._held.clear()
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.collect()

    @contextlib.contextmanager
    def _translate(self, what: str, *, channel_lost: bool = False,
                   refused: type[TransportError] = TransportError) -> Iterator[None]:
        """Turn py-amqp and socket errors into ours.

        ``channel_lost``: a channel error means the link is unusable (the consuming
        channel: RabbitMQ dropped its consumers and requeued what it held).
        """
        if self._conn is None:
            raise ConnectionLost(f"{what}: {self!r} is not connected")
        try:
            yield
        except amqp_errors.ChannelError as exc:
            if channel_lost:
                self._abandon()
                raise ConnectionLost(f"{what}: {describe_error(exc)}") from exc
            raise refused(f"{what}: {describe_error(exc)}") from exc
        except amqp_errors.MessageNacked as exc:
            raise PublishError(f"{what}: the broker refused the message (nack)") from exc
        except _LINK_ERRORS as exc:
            self._abandon()
            raise ConnectionLost(f"{what}: {describe_error(exc)}") from exc

    # -- topology -----------------------------------------------------------------------

    def declare(self, queue: Queue) -> None:
        self._require()
        if self._queues.get(queue.name) == queue:
            return
        exchange = queue.bound_exchange
        with self._translate(f"declaring queue {queue.name!r}"):
            if exchange.name:
                self._declare_exchange(exchange)
            self._pub.queue_declare(
                queue=queue.name, durable=queue.durable, exclusive=queue.exclusive,
                auto_delete=queue.auto_delete, arguments=self._queue_arguments(queue),
            )
            if exchange.name:
                self._pub.queue_bind(queue=queue.name, exchange=exchange.name,
                                     routing_key=queue.bound_routing_key)
        self._queues[queue.name] = queue
        if self._delays(queue):
            self._bind_delayed(ndd.destination_bindings(queue))

    def declare_exchange(self, exchange: Exchange) -> None:
        self._require()
        if exchange.name and exchange.name not in self._exchanges:
            with self._translate(f"declaring exchange {exchange.name!r}"):
                self._declare_exchange(exchange)

    def _declare_exchange(self, exchange: Exchange) -> None:
        if exchange.name in self._exchanges:
            return
        self._pub.exchange_declare(
            exchange=exchange.name, type=exchange.type, durable=exchange.durable,
            auto_delete=exchange.auto_delete, arguments=dict(exchange.arguments),
        )
        self._exchanges.add(exchange.name)

    def _queue_arguments(self, queue: Queue) -> dict[str, Any]:
        arguments = dict(queue.arguments)
        if queue.queue_type == "quorum":
            arguments[QUEUE_TYPE_ARG] = "quorum"
            if queue.max_priority is not None:
                logger.warning("queue %r: quorum queues have no x-max-priority; ignored",
                               queue.name)
        elif queue.max_priority is not None:
            arguments[MAX_PRIORITY_ARG] = int(queue.max_priority)
        return arguments

    # -- native delayed delivery ----------------------------------------------------------

    def _delays(self, queue: Queue) -> bool:
        """Whether delayed messages for ``queue`` wait in the broker."""
        if self._delay_mode == "auto":
            return queue.queue_type == "quorum"
        return bool(self._delay_mode)

    @property
    def supports_delay(self) -> bool:  # type: ignore[override]
        """True when every queue declared on this connection is delayed in the broker.

        The base class has a class-wide flag; here it depends on the queues (see the
        module docstring), so it is a property of the connected transport.
        """
        if self._delay_mode is False:
            return False
        if self._delay_mode is True:
            return True
        return bool(self._queues) and all(self._delays(q) for q in self._queues.values())

    def can_delay(self, exchange: str, routing_key: str) -> bool:
        """Whether ``publish(delay=...)`` to this destination waits in the broker."""
        if self._delay_mode is False:
            return False
        if ndd.is_delay_exchange(exchange):
            return True
        if not exchange:
            queue = self._queues.get(routing_key)
            return self._delay_mode is True or (queue is not None and self._delays(queue))
        # Only through bindings we know: a delayed message nobody is bound for would be
        # dropped at the ladder's end, where no publisher hears of it.
        return any(self._delays(q) for q in self._queues_on(exchange, routing_key))

    def _queues_on(self, exchange: str, routing_key: str | None = None) -> list[Queue]:
        """Declared queues bound to ``exchange`` (that ``routing_key`` reaches, if given)."""
        queues = [q for q in self._queues.values() if q.bound_exchange.name == exchange]
        if routing_key is None:
            return queues
        return [q for q in queues if _reaches(q, routing_key)]

    def _declare_ladder(self) -> None:
        if self._ndd_ready:
            return
        with self._translate("declaring the delayed-delivery topology"):
            ndd.declare_ladder(self._pub, self._level_queue_type)
        self._ndd_ready = True

    def _bind_delayed(self, bindings: Sequence[tuple[str, str, str, str]]) -> None:
        self._declare_ladder()
        with self._translate("binding to the delayed-delivery exchange"):
            for binding in bindings:
                if binding in self._ndd_bound:
                    continue
                kind, destination, source, key = binding
                if kind == "exchange":
                    self._pub.exchange_bind(destination=destination, source=source,
                                            routing_key=key)
                else:
                    self._pub.queue_bind(queue=destination, exchange=source, routing_key=key)
                self._ndd_bound.add(binding)

    def _delayed_target(self, exchange: str, routing_key: str,
                        delay: float) -> tuple[str, str] | None:
        """Where a delayed message goes: the ladder's first exchange and key, or None."""
        if not self.can_delay(exchange, routing_key):
            logger.debug("%r: no broker-side delay for exchange=%r routing_key=%r: "
                         "published now, the worker holds it", self, exchange, routing_key)
            return None
        seconds = int(delay)
        if seconds > ndd.MAX_DELAY:
            raise PublishError(
                f"cannot delay a message by {delay:.0f} s: RabbitMQ's delayed delivery "
                f"waits at most {ndd.MAX_DELAY} s (2**28 - 1, about 8.5 years)"
            )
        if ndd.is_delay_exchange(exchange):
            self._declare_ladder()
        elif not exchange:
            self._bind_delayed([ndd.direct_binding(routing_key)])
        else:
            # Every queue we know on the exchange, classic ones too, so none misses it.
            for queue in self._queues_on(exchange):
                self._bind_delayed(ndd.destination_bindings(queue))
        return ndd.FIRST_EXCHANGE, ndd.delayed_routing_key(seconds, routing_key)

    # -- publishing -------------------------------------------------------------------------

    def publish(
        self,
        envelope: Envelope,
        *,
        exchange: str,
        routing_key: str,
        delay: float | None = None,
    ) -> None:
        self._require()
        if delay is not None and delay >= 1:
            target = self._delayed_target(exchange, routing_key, delay)
            if target is not None:
                exchange, routing_key = target
        elif ndd.is_delay_exchange(exchange):
            # A message taken from the ladder and sent again at once: straight to the
            # final hop, with a zero delay (its bindings expect the 28 digits).
            exchange = ndd.DELIVERY_EXCHANGE
            routing_key = ndd.undelayed_routing_key(routing_key)
        if len(routing_key.encode()) > MAX_SHORTSTR:
            raise PublishError(f"routing key longer than {MAX_SHORTSTR} bytes: {routing_key!r}")
        message = to_amqp(envelope)
        what = f"publishing to exchange={exchange!r} routing_key={routing_key!r}"
        self._returned.clear()
        with self._translate(what, refused=PublishError):
            self._pub.basic_publish_confirm(
                message, exchange=exchange, routing_key=routing_key, mandatory=True,
                confirm_timeout=self._confirm_timeout,
            )
        if self._returned:
            error, rexchange, rkey = self._returned[0]
            self._returned.clear()
            raise PublishError(
                f"unroutable message: exchange={rexchange!r} routing_key={rkey!r} "
                f"({describe_error(error)})"
            )

    def _on_return(self, error: Any, exchange: str, routing_key: str, _message: Any) -> None:
        self._returned.append((error, exchange, routing_key))

    # -- consuming ----------------------------------------------------------------------------

    def consume(self, queues: Sequence[Queue], *, prefetch_count: int = 0) -> None:
        self._require()
        for queue in queues:
            self.declare(queue)
        self._prefetch = prefetch_count
        with self._translate("setting the prefetch count", channel_lost=True):
            self._qos(prefetch_count)
            for queue in queues:
                self._consumed[queue.name] = queue
                if queue.name not in self._consumers:
                    self._start_consumer(queue.name)

    def _qos(self, prefetch_count: int) -> None:
        count = min(max(prefetch_count, 0), MAX_PREFETCH)
        # Never global: quorum queues and RabbitMQ 4 refuse it.
        self._sub.basic_qos(prefetch_size=0, prefetch_count=count, a_global=False)

    def _start_consumer(self, queue_name: str) -> None:
        tag = self._sub.basic_consume(queue=queue_name, no_ack=False, callback=self._on_delivery)
        self._consumers[queue_name] = tag
        self._tag_queue[tag] = queue_name

    def _stop_consumer(self, queue_name: str) -> None:
        tag = self._consumers.pop(queue_name, None)
        if tag is not None:
            self._sub.basic_cancel(tag)
            self._tag_queue.pop(tag, None)

    def cancel(self, queue_name: str) -> None:
        self._consumed.pop(queue_name, None)
        if self._conn is None or queue_name not in self._consumers:
            return
        with self._translate(f"cancelling the consumer of {queue_name!r}", channel_lost=True):
            self._stop_consumer(queue_name)
            # Received but never handed out: give them back for other consumers now.
            keep: collections.deque[Message] = collections.deque()
            for message in self._buffer:
                if message.delivery_info.get("queue") == queue_name:
                    self._sub.basic_reject(message.delivery_tag, requeue=True)
                else:
                    keep.append(message)
            self._buffer = keep

    def set_prefetch(self, prefetch_count: int) -> None:
        self._prefetch = prefetch_count
        if self._conn is None:
            return
        with self._translate("changing the prefetch count", channel_lost=True):
            self._qos(prefetch_count)
            # Per-consumer QoS binds consumers started after it: restart ours.
            for name in list(self._consumers):
                self._stop_consumer(name)
                self._start_consumer(name)

    def _on_delivery(self, raw: Any) -> None:
        queue = self._tag_queue.get(raw.delivery_info.get("consumer_tag", ""), "")
        self._buffer.append(from_amqp(self, raw, queue))

    def poll(self, timeout: float | None = None) -> list[Message]:
        conn = self._require()
        room = self._room()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._translate("receiving", channel_lost=True):
            while not self._buffer or room <= 0:
                self._tick()
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    break
                wait = self._slice if deadline is None else min(self._slice, deadline - now)
                if room <= 0:
                    wait = min(wait, _FULL_WAIT)  # the caller must settle first
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=wait)
                if room <= 0:
                    break
            self._drain_pending(room)
            self._tick()
        return self._take(room)

    def _drain_pending(self, limit: int) -> None:
        """Take in up to ``limit`` frames that already arrived, without waiting."""
        for _ in range(max(limit - len(self._buffer), 1)):
            if not self._may_have_frames():
                return
            try:
                self._conn.drain_events(timeout=0)
            except TimeoutError:
                return

    def _may_have_frames(self) -> bool:
        """False when nothing can be read now (see ``amqp_io.may_have_frames``)."""
        return self._ssl or may_have_frames(self._conn)

    def _room(self) -> int:
        if self._prefetch <= 0:
            return self._max_batch
        return self._prefetch - len(self._held)

    def _take(self, room: int) -> list[Message]:
        taken: list[Message] = []
        while self._buffer and len(taken) < room:
            message = self._buffer.popleft()
            self._held[message.delivery_tag] = message
            taken.append(message)
        return taken

    def _tick(self) -> None:
        now = time.monotonic()
        if now - self._last_tick >= self._slice:
            self._last_tick = now
            self._conn.heartbeat_tick()

    def _release(self, message: Message) -> None:
        if self._held.get(message.delivery_tag) is not message:
            raise MessageStateError(
                f"{message!r} is not held by this connection (it came back to its queue "
                "when the connection that received it closed)"
            )
        del self._held[message.delivery_tag]

    def ack(self, message: Message) -> None:
        self._require()
        self._release(message)
        with self._translate("acknowledging a message", channel_lost=True):
            self._sub.basic_ack(message.delivery_tag)

    def ack_many(self, messages: Sequence[Message]) -> None:
        """Ack held messages with as few ``basic.ack`` frames as the channel allows.

        py-spy on a no-op drain showed a frame write per ack (``basic_ack`` ->
        ``write``) as a fifth of the consumer's time. When the batch holds every
        held message up to some delivery tag, one ``basic.ack(multiple=True)``
        settles them all (the messages still in the buffer came later, with higher
        tags, and are not touched); the others go one by one.
        """
        if len(messages) == 1:
            messages[0].ack()
            return
        self._require()
        for message in messages:
            message._check_unsettled()
            if self._held.get(message.delivery_tag) is not message:
                self._release(message)  # raises MessageStateError
        batch = {message.delivery_tag for message in messages}
        upto = None
        for tag in sorted(self._held):
            if tag not in batch:
                break
            upto = tag
        for message in messages:
            self._held.pop(message.delivery_tag, None)
        with self._translate("acknowledging messages", channel_lost=True):
            if upto is not None:
                self._sub.basic_ack(upto, multiple=True)
            for tag in sorted(batch):
                if upto is None or tag > upto:
                    self._sub.basic_ack(tag)
        for message in messages:
            message.state = MessageState.ACKED

    def reject(self, message: Message, *, requeue: bool) -> None:
        self._require()
        self._release(message)
        with self._translate("rejecting a message", channel_lost=True):
            self._sub.basic_reject(message.delivery_tag, requeue=requeue)

    def maintain(self) -> None:
        if self._conn is None:
            return
        with self._translate("servicing heartbeats", channel_lost=True):
            # Read what waits (the broker's heartbeats count only once read; deliveries
            # go to the buffer for the next poll), then send ours if due.
            self._drain_pending(self._max_batch)
            self._last_tick = 0.0
            self._tick()

    # -- administration ---------------------------------------------------------------------

    def purge(self, queue_name: str) -> int:
        self._require()
        try:
            with self._translate(f"purging {queue_name!r}"):
                return int(self._pub.queue_purge(queue=queue_name) or 0)
        except TransportError as exc:
            if isinstance(exc.__cause__, amqp_errors.NotFound):
                return 0
            raise

    def queue_size(self, queue_name: str) -> int:
        self._require()
        try:
            with self._translate(f"checking the size of {queue_name!r}"):
                ok = self._pub.queue_declare(queue=queue_name, passive=True)
        except TransportError as exc:
            if isinstance(exc.__cause__, amqp_errors.NotFound):
                return 0
            raise
        return int(ok.message_count)

    def delete_queue(self, queue_name: str) -> None:
        """Delete ``queue_name`` (tests and tools; not part of the transport interface)."""
        self._require()
        self.cancel(queue_name)
        with self._translate(f"deleting queue {queue_name!r}"):
            self._pub.queue_delete(queue=queue_name)
        self._queues.pop(queue_name, None)

    def delete_exchange(self, exchange_name: str) -> None:
        """Delete ``exchange_name`` (tests and tools; not part of the transport interface)."""
        self._require()
        with self._translate(f"deleting exchange {exchange_name!r}"):
            self._pub.exchange_delete(exchange=exchange_name)
        self._exchanges.discard(exchange_name)


def _reaches(queue: Queue, routing_key: str) -> bool:
    """Whether a message with ``routing_key`` on the queue's exchange reaches ``queue``."""
    kind = queue.bound_exchange.type
    if kind == "fanout":
        return True
    if kind == "topic":
        return topic_matches(queue.bound_routing_key, routing_key)
    return kind == "direct" and queue.bound_routing_key == routing_key
