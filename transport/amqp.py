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
    prefetch bound), ``client_name`` (shown by ``rabbitmqctl list_connections``),
    ``delivery_limit`` (None; a number: quorum queues are declared with that
    ``x-delivery-limit`` and a dead-letter route to ``<queue>.dead``, see
    ``amqp_failures`` for what is counted where and why it is not the default).

Settling: ``reject(requeue=True)`` is a ``basic.nack`` (RabbitMQ 4.3+ does not count
it as a failed delivery), ``requeue_failed`` and ``dead_letter`` are in ``amqp_failures``.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from amqp import exceptions as amqp_errors

from . import amqp_delayed as ndd
from . import amqp_failures as failures
from .amqp_acks import Held
from .amqp_link import Link
from .amqp_messages import describe_error, from_amqp, to_amqp
from .amqp_topology import Topology
from .base import Envelope, Message, MessageState, Transport
from .entities import Exchange, Queue
from .errors import ImproperlyConfigured, PublishError, TransportError
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
_URL_OPTIONS = frozenset({"heartbeat", "connect_timeout", "confirm_timeout"})
# While the prefetch bound is reached, poll() waits this long at most.
_FULL_WAIT = 0.05


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
        password = parsed.password if parsed.password is not None else DEFAULT_PASSWORD
        self._vhost = parsed.virtual_host or DEFAULT_VHOST
        self._ssl: Any = opts.get("ssl", tls) or tls
        connect_timeout = float(opts.get("connect_timeout", DEFAULT_CONNECT_TIMEOUT))
        heartbeat = float(opts.get("heartbeat", DEFAULT_HEARTBEAT) or 0)
        self._confirm_timeout = float(opts.get("confirm_timeout", DEFAULT_CONFIRM_TIMEOUT))
        self._max_batch = int(opts.get("max_batch", DEFAULT_MAX_BATCH))
        client_name = str(opts.get("client_name", "taskframe"))
        mode = opts.get("delayed_delivery", "auto")
        if mode not in ("auto", True, False):
            raise ImproperlyConfigured(
                f"delayed_delivery must be 'auto', True or False, not {mode!r}"
            )
        self._delay_mode: str | bool = mode
        self._level_queue_type = str(
            opts.get("delayed_delivery_queue_type", ndd.DEFAULT_LEVEL_QUEUE_TYPE)
        )
        self._delivery_limit = int(opts.get("delivery_limit") or 0) or None
        if self._level_queue_type not in ("classic", "quorum"):
            raise ImproperlyConfigured("delayed_delivery_queue_type must be classic or quorum")
        self._link = Link(repr(self), {
            "host": f"{self._host}:{self._port}", "userid": self._user, "password": password,
            "virtual_host": self._vhost, "ssl": self._ssl, "connect_timeout": connect_timeout,
            "heartbeat": heartbeat, "client_properties": {"connection_name": client_name},
        }, heartbeat=heartbeat)
        self._reset_state()

    def _reset_state(self) -> None:
        self._topology = Topology(self._link, self._delay_mode, self._level_queue_type,
                                  self._delivery_limit)
        self._consumers: dict[str, str] = {}  # queue name -> consumer tag
        self._tag_queue: dict[str, str] = {}  # consumer tag -> queue name
        self._consumed: dict[str, Queue] = {}
        self._prefetch = 0
        self._buffer: collections.deque[Message] = collections.deque()
        self._held = Held(self._link.lock)  # and the acks the broker has processed
        self._returned: list[tuple[Any, str, str]] = []

    def __repr__(self) -> str:
        scheme = "amqps" if self._ssl else "amqp"
        return f"<AMQPTransport {scheme}://{self._user}@{self._host}:{self._port}/{self._vhost}>"

    # -- connection -------------------------------------------------------------------

    def connect(self) -> None:
        if self._link.conn is not None:
            return
        self._reset_state()
        self._link.open(on_return=self._on_return)
        self._held.confirms.bind(self._link.conn, self._link.sub)

    def close(self) -> None:
        with self._link.lock:  # not while a slot writes an early ack
            self._buffer.clear()
            self._held.clear()
            self._link.close()

    @property
    def acks_from_any_thread(self) -> bool:
        """Plain TCP only: a TLS connection must not be read and written at once."""
        return not self._ssl

    @property
    def connected(self) -> bool:
        return self._link.connected

    # -- topology -----------------------------------------------------------------------

    def declare(self, queue: Queue) -> None:
        self._link.require()
        self._topology.declare(queue)

    def declare_exchange(self, exchange: Exchange) -> None:
        self._link.require()
        self._topology.declare_exchange(exchange)

    @property
    def supports_delay(self) -> bool:  # type: ignore[override]
        """True when every queue declared on this connection is delayed in the broker.

        The base class has a class-wide flag; here it depends on the queues (see the
        module docstring), so it is a property of the connected transport.
        """
        return self._topology.delays_all()

    def can_delay(self, exchange: str, routing_key: str) -> bool:
        """Whether ``publish(delay=...)`` to this destination waits in the broker."""
        return self._topology.can_delay(exchange, routing_key)

    # -- publishing -------------------------------------------------------------------------

    def publish(
        self,
        envelope: Envelope,
        *,
        exchange: str,
        routing_key: str,
        delay: float | None = None,
    ) -> None:
        link = self._link
        link.require()
        if delay is not None and delay >= 1:
            target = self._topology.delayed_target(exchange, routing_key, delay)
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
        with link.translate(what, refused=PublishError):
            link.pub.basic_publish_confirm(
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
        self._link.require()
        for queue in queues:
            self.declare(queue)
        self._prefetch = prefetch_count
        with self._link.translate("setting the prefetch count", channel_lost=True):
            self._qos(prefetch_count)
            for queue in queues:
                self._consumed[queue.name] = queue
                if queue.name not in self._consumers:
                    self._start_consumer(queue.name)

    def _qos(self, prefetch_count: int) -> None:
        count = min(max(prefetch_count, 0), MAX_PREFETCH)
        # Never global (quorum queues and RabbitMQ 4 refuse it); ``Confirms`` counts qos-oks.
        link, confirms = self._link, self._held.confirms
        confirms.wait(link.conn, confirms.send(link.sub, count), tick=link.tick, slice_=link.slice)

    def _start_consumer(self, queue_name: str) -> None:
        tag = self._link.sub.basic_consume(queue=queue_name, no_ack=False,
                                           callback=self._on_delivery)
        self._consumers[queue_name] = tag
        self._tag_queue[tag] = queue_name

    def _stop_consumer(self, queue_name: str) -> None:
        tag = self._consumers.pop(queue_name, None)
        if tag is not None:
            self._link.sub.basic_cancel(tag)
            self._tag_queue.pop(tag, None)

    def cancel(self, queue_name: str) -> None:
        self._consumed.pop(queue_name, None)
        if self._link.conn is None or queue_name not in self._consumers:
            return
        with self._link.translate(f"cancelling the consumer of {queue_name!r}",
                                  channel_lost=True):
            self._stop_consumer(queue_name)
            # Received but never handed out: give them back for other consumers now.
            keep: collections.deque[Message] = collections.deque()
            for message in self._buffer:
                if message.delivery_info.get("queue") == queue_name:
                    self._link.give_back(message.delivery_tag)
                else:
                    keep.append(message)
            self._buffer = keep

    def set_prefetch(self, prefetch_count: int) -> None:
        self._prefetch = prefetch_count
        if self._link.conn is None:
            return
        with self._link.translate("changing the prefetch count", channel_lost=True):
            self._qos(prefetch_count)
            # Per-consumer QoS binds consumers started after it: restart ours.
            for name in list(self._consumers):
                self._stop_consumer(name)
                self._start_consumer(name)

    def _on_delivery(self, raw: Any) -> None:
        queue = self._tag_queue.get(raw.delivery_info.get("consumer_tag", ""), "")
        self._buffer.append(from_amqp(self, raw, queue))

    def poll(self, timeout: float | None = None) -> list[Message]:
        link = self._link
        conn = link.require()
        room = self._room()
        deadline = None if timeout is None else time.monotonic() + timeout
        with link.translate("receiving", channel_lost=True):
            while not self._buffer or room <= 0:
                link.tick()
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    break
                wait = link.slice if deadline is None else min(link.slice, deadline - now)
                if room <= 0:
                    wait = min(wait, _FULL_WAIT)  # the caller must settle first
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=wait)
                if room <= 0:
                    break
            link.drain_pending(max(room - len(self._buffer), 1))
            link.tick()
        return self._take(room)

    def _room(self) -> int:
        if self._prefetch <= 0:
            return self._max_batch
        return self._prefetch - len(self._held)

    def _take(self, room: int) -> list[Message]:
        taken: list[Message] = []
        while self._buffer and len(taken) < room:
            taken.append(self._buffer.popleft())
        self._held.take(taken)
        return taken

    def ack(self, message: Message) -> None:
        link = self._link
        link.require()
        with self._held.settling(message), link.translate("acknowledging a message",
                                                           channel_lost=True):
            link.sub.basic_ack(message.delivery_tag)

    def ack_many(self, messages: Sequence[Message]) -> None:
        """Ack held messages with as few ``basic.ack`` frames as the channel allows
        (``amqp_acks.plan``)."""
        if len(messages) == 1:
            messages[0].ack()
            return
        link = self._link
        link.require()
        with link.lock:  # the plan and its frames: a slot's early ack goes before or after
            upto, singles = self._held.plan(messages)
            with link.translate("acknowledging messages", channel_lost=True):
                if upto is not None:
                    link.sub.basic_ack(upto, multiple=True)
                for tag in singles:
                    link.sub.basic_ack(tag)
        for message in messages:
            message.state = MessageState.ACKED

    def ack_early(self, messages: Sequence[Message]) -> None:
        """Write the acks and a ``basic.qos`` whose ``qos-ok`` will say the broker has them
        (``amqp_acks.Confirms``), without waiting: until then, ``unconfirmed_acks()``.
        From any thread: a failed write does not drop the link (the loop, which reads
        it, does)."""
        link = self._link
        link.require()
        with link.translate("acknowledging messages", channel_lost=True, abandon=False):
            self._held.ack_early(messages)

    def unconfirmed_acks(self) -> list[Message]:
        return self._held.confirms.unconfirmed()

    def reject(self, message: Message, *, requeue: bool) -> None:
        link = self._link
        link.require()
        with self._held.settling(message), link.translate("rejecting a message",
                                                           channel_lost=True):
            if requeue:  # not a failed delivery: RabbitMQ 4.3+ counts basic.reject
                link.give_back(message.delivery_tag)
            else:
                link.sub.basic_reject(message.delivery_tag, requeue=False)

    def requeue_failed(self, message: Message) -> None:
        self._link.require()
        queue = self._topology.queues.get(str(message.delivery_info.get("queue")))
        with self._held.settling(message):
            failures.requeue_failed(self._link, self.publish, message, queue)

    def dead_letter(self, message: Message) -> str | None:
        self._link.require()
        name = str(message.delivery_info.get("queue"))
        route = self._topology.dead_letter_routes.get(name)
        queue = self._topology.queues.get(name) or Queue(name)
        with self._held.settling(message):
            return failures.dead_letter(self._link, self.publish, message, queue, route)

    def maintain(self) -> None:
        link = self._link
        if link.conn is None:
            return
        with link.translate("servicing heartbeats", channel_lost=True):
            # Read what waits (the broker's heartbeats count only once read; deliveries
            # go to the buffer for the next poll), then send ours if due.
            link.drain_pending(max(self._max_batch - len(self._buffer), 1))
            link.heartbeat()

    # -- administration ---------------------------------------------------------------------

    def purge(self, queue_name: str) -> int:
        link = self._link
        link.require()
        try:
            with link.translate(f"purging {queue_name!r}"):
                return int(link.pub.queue_purge(queue=queue_name) or 0)
        except TransportError as exc:
            if isinstance(exc.__cause__, amqp_errors.NotFound):
                return 0
            raise

    def queue_size(self, queue_name: str) -> int:
        link = self._link
        link.require()
        try:
            with link.translate(f"checking the size of {queue_name!r}"):
                ok = link.pub.queue_declare(queue=queue_name, passive=True)
        except TransportError as exc:
            if isinstance(exc.__cause__, amqp_errors.NotFound):
                return 0
            raise
        return int(ok.message_count)

    def delete_queue(self, queue_name: str) -> None:
        """Delete ``queue_name`` (tests and tools; not part of the transport interface)."""
        link = self._link
        link.require()
        self.cancel(queue_name)
        with link.translate(f"deleting queue {queue_name!r}"):
            link.pub.queue_delete(queue=queue_name)
        self._topology.queues.pop(queue_name, None)

    def delete_exchange(self, exchange_name: str) -> None:
        """Delete ``exchange_name`` (tests and tools; not part of the transport interface)."""
        link = self._link
        link.require()
        with link.translate(f"deleting exchange {exchange_name!r}"):
            link.pub.exchange_delete(exchange=exchange_name)
        self._topology.exchanges.discard(exchange_name)
