"""The transport interface: what every broker transport implements.

A transport owns one connection to one broker and is used from one thread at a
time (py-amqp channels are not thread-safe, and the same rule keeps the others
simple). The worker's consumer loop owns the consuming transport; publishers get
their own (``Connection`` hands one out per thread).

The interface is small on purpose and fits AMQP, Redis and SQL alike:

* ``connect`` / ``close``: open and release the link to the broker.
* ``declare``: make a queue (and its exchange and binding) exist.
* ``publish``: put one ``Envelope`` on an exchange with a routing key,
  optionally delayed broker-side.
* ``consume`` / ``cancel`` / ``set_prefetch``: say what to receive and how much
  may be held unacknowledged at once.
* ``poll``: wait up to ``timeout`` seconds and return the messages received.
* ``ack`` / ``reject``: settle a received message.
* ``requeue_failed`` / ``dead_letter`` (optional, with defaults): give a message
  back counting a failed delivery, or set it aside for good (the delivery limit).
* ``maintain``: periodic upkeep called from the consumer loop (AMQP heartbeats,
  keeping claims of held messages fresh, moving due delayed messages).
* ``purge`` / ``queue_size``: administration.

Messages on the wire are ``Envelope`` objects (body bytes plus headers and
properties); received ones are ``Message`` objects that know how to settle
themselves through the transport that delivered them.

Semantics every transport keeps:

* A delivered message is held (unacknowledged) until ``ack`` or ``reject``; a
  held message is never given to another consumer while this transport lives
  and keeps calling ``maintain``. When the holder dies, the message comes back
  (AMQP: channel close; Redis/SQL: visibility timeout).
* ``publish(delay=...)`` keeps the message in the broker until it is due; a
  transport that cannot do that says so with ``supports_delay = False`` and the
  caller keeps the delay itself.
* Priorities use AMQP's direction: a larger number is more urgent (0-255),
  except where a transport sets ``lower_priority_first = True`` (Redis, to mean
  what kombu and Celery mean there: a lower number is consumed first).
* No client-library exception escapes: everything is translated into
  ``taskframe.transport.errors``.

Failed deliveries (what a delivery limit counts): ``Message.delivery_count`` is
1 on a first delivery, plus one for each earlier delivery of the message that
ended without being settled: its holder died (AMQP: the channel closed with it
unacknowledged; Redis: restored after the visibility timeout; SQL: its claim
expired) or gave it back with ``requeue_failed`` (the process running it died).
A plain requeue (``reject(requeue=True)``) and the give-back of ``close()`` are
not counted, where the broker can tell them apart: each transport's docstring
says what its count includes. A copy published again (a deferred ETA) starts
over at 1. ``dead_letter`` keeps a message in the queue ``<queue>.dead``
(``dead_letter_queue``), where nobody consumes it unless asked to, with its
count started over, so that moving it back runs it again.
"""

from __future__ import annotations

import abc
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .entities import Exchange, Queue, dead_letter_queue
from .errors import MessageStateError
from .serialization import MAX_BODY_SIZE, decode_body

__all__ = ["Envelope", "Message", "MessageState", "Transport", "dead_letter_queue"]


@dataclass
class Envelope:
    """One outgoing message: serialized body plus AMQP-style headers and properties.

    ``properties`` holds ``correlation_id``, ``reply_to``, ``delivery_mode``,
    ``priority``, ``expiration`` and any other AMQP basic property.
    """

    body: bytes
    content_type: str = "application/json"
    content_encoding: str = "utf-8"
    headers: dict[str, Any] = field(default_factory=dict)
    properties: dict[str, Any] = field(default_factory=dict)


class MessageState:
    """The settlement states of a received message."""

    RECEIVED = "RECEIVED"
    ACKED = "ACKED"
    REJECTED = "REJECTED"
    REQUEUED = "REQUEUED"
    #: the connection it arrived on dropped: the broker gives it back by itself.
    LOST = "LOST"


class Message:
    """One received message, held until it is acked or rejected.

    Attributes:
        body: the raw (possibly compressed) body bytes.
        content_type / content_encoding: how ``body`` is serialized.
        headers: application headers (the Celery task headers live here).
        properties: AMQP-style properties (``correlation_id``, ``reply_to``,
            ``priority``, ...).
        delivery_info: ``exchange``, ``routing_key``, ``priority``,
            ``redelivered`` and ``queue`` as the broker reported them, and
            ``delivery_count`` where the transport counts (``delivery_count``).
        delivery_tag: the transport's handle for settling this message.
    """

    __slots__ = (
        "body",
        "content_encoding",
        "content_type",
        "delivery_info",
        "delivery_tag",
        "headers",
        "properties",
        "state",
        "transport",
    )

    def __init__(
        self,
        transport: Transport,
        *,
        body: bytes,
        delivery_tag: Any,
        content_type: str = "application/json",
        content_encoding: str = "utf-8",
        headers: Mapping[str, Any] | None = None,
        properties: Mapping[str, Any] | None = None,
        delivery_info: Mapping[str, Any] | None = None,
    ) -> None:
        self.transport = transport
        self.body = body
        self.delivery_tag = delivery_tag
        self.content_type = content_type
        self.content_encoding = content_encoding
        self.headers: dict[str, Any] = dict(headers or {})
        self.properties: dict[str, Any] = dict(properties or {})
        self.delivery_info: dict[str, Any] = dict(delivery_info or {})
        self.state = MessageState.RECEIVED

    @property
    def settled(self) -> bool:
        """True once the message was acked, rejected or requeued."""
        return self.state != MessageState.RECEIVED

    def ack(self) -> None:
        """Tell the broker the message is done; it is removed for good."""
        self._check_unsettled()
        self.transport.ack(self)
        self.state = MessageState.ACKED

    def reject(self, requeue: bool = False) -> None:
        """Give the message back (``requeue=True``) or drop it (``requeue=False``)."""
        self._check_unsettled()
        self.transport.reject(self, requeue=requeue)
        self.state = MessageState.REQUEUED if requeue else MessageState.REJECTED

    def requeue(self) -> None:
        """Give the message back to its queue for another consumer."""
        self.reject(requeue=True)

    def requeue_failed(self) -> None:
        """Give the message back, counting this delivery as failed (``delivery_count``).

        For a delivery whose run was lost with the process running it (a pool child
        that died): a plain ``requeue()`` is not counted.
        """
        self._check_unsettled()
        self.transport.requeue_failed(self)
        self.state = MessageState.REQUEUED

    def dead_letter(self) -> str | None:
        """Settle the message for good, kept aside: return where it went (None: dropped).

        The transport moves it to ``<queue>.dead`` (RabbitMQ: the queue's dead-letter
        exchange when it has one), where it waits with its count started over.
        """
        self._check_unsettled()
        where = self.transport.dead_letter(self)
        self.state = MessageState.REJECTED
        return where

    @property
    def delivery_count(self) -> int:
        """This delivery and the earlier ones that ended without a settle (1 the first time).

        See "Failed deliveries" in ``taskframe.transport.base``; a transport that does
        not count reports 1.
        """
        try:
            return max(1, int(self.delivery_info.get("delivery_count") or 1))
        except (TypeError, ValueError):
            return 1

    def decode(self, accept: Collection[str] | None = None,
               max_size: int | None = MAX_BODY_SIZE) -> Any:
        """The body, decompressed and deserialized.

        Args:
            accept: serializer names or MIME types allowed; ``None`` means JSON only.
            max_size: the most bytes the body may have, as received or decompressed
                (``None``: no bound); checked before the body grows past it.

        Raises:
            ContentDisallowed: the content type is not accepted.
            DecodeError: the body does not decompress or parse, or it is too big.
        """
        return decode_body(self, accept, max_size)

    def to_envelope(self) -> Envelope:
        """A copy of this message for publishing again (retries, delays)."""
        return Envelope(
            body=self.body,
            content_type=self.content_type,
            content_encoding=self.content_encoding,
            headers=dict(self.headers),
            properties=dict(self.properties),
        )

    def _check_unsettled(self) -> None:
        if self.settled:
            raise MessageStateError(
                f"message {self.delivery_tag!r} was already settled ({self.state})"
            )

    def __repr__(self) -> str:
        return (
            f"<Message tag={self.delivery_tag!r} state={self.state} "
            f"routing_key={self.delivery_info.get('routing_key')!r}>"
        )


class Transport(abc.ABC):
    """One connection to one broker. Subclasses implement every abstract method.

    Class attributes:
        schemes: URL schemes this transport serves (``("sqlite", "sqla+postgresql")``).
        supports_delay: ``publish(delay=...)`` keeps the message broker-side.
        supports_fanout: fanout exchanges (broadcast) work.
        default_port: used when the URL names none.
        keeps_deliveries: a delivery belongs to this transport object, not to its link
            (see ``drop``).
    """

    schemes: ClassVar[tuple[str, ...]] = ()
    supports_delay: ClassVar[bool] = False
    supports_fanout: ClassVar[bool] = False
    lower_priority_first: ClassVar[bool] = False
    default_port: ClassVar[int | None] = None
    keeps_deliveries: ClassVar[bool] = False

    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        """Remember the URL and ``broker_transport_options``; do not connect yet."""
        self.url = url
        self.options: dict[str, Any] = dict(options or {})

    # -- connection ---------------------------------------------------------------

    @abc.abstractmethod
    def connect(self) -> None:
        """Open the link to the broker.

        Raises:
            BrokerConnectionError: the broker cannot be reached.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Release the link. Held messages come back to their queues. Idempotent."""

    def drop(self) -> None:
        """The link failed: let it go, for ``connect()`` to open another.

        Where ``keeps_deliveries`` is True (Redis, SQL: a held message is a claim in the
        broker's data, which outlives a socket), the messages held before stay held by
        this object: ``connect()`` writes the acks, rejects and requeues that could not be
        written, renews the claims, and they can be settled as usual. Elsewhere (AMQP:
        the broker requeues a closed channel's deliveries) this is ``close()``.
        """
        self.close()

    @property
    @abc.abstractmethod
    def connected(self) -> bool:
        """True while the link is believed to be up."""

    # -- topology -------------------------------------------------------------------

    @abc.abstractmethod
    def declare(self, queue: Queue) -> None:
        """Make ``queue``, its exchange and the binding between them exist. Idempotent."""

    def declare_exchange(self, exchange: Exchange) -> None:  # noqa: B027 - optional hook
        """Make ``exchange`` exist. Transports without exchanges need not override."""

    # -- publishing -------------------------------------------------------------------

    @abc.abstractmethod
    def publish(
        self,
        envelope: Envelope,
        *,
        exchange: str,
        routing_key: str,
        delay: float | None = None,
    ) -> None:
        """Put one message on ``exchange`` with ``routing_key``.

        Returns once the broker holds the message (publisher confirms on AMQP,
        a committed row on SQL). ``exchange=""`` is the default exchange: the
        routing key names the queue. ``delay`` (seconds) keeps the message
        invisible until due when ``supports_delay`` is true.

        Raises:
            PublishError: the broker refused the message.
            ConnectionLost: the link dropped; the message may not have arrived.
        """

    def can_delay(self, exchange: str, routing_key: str) -> bool:
        """Whether ``publish(delay=...)`` to this destination waits in the broker.

        The default is ``supports_delay``; a transport whose delays depend on the
        queue (AMQP: quorum queues only, unless forced) answers per destination.
        """
        return self.supports_delay

    # -- consuming --------------------------------------------------------------------

    @abc.abstractmethod
    def consume(self, queues: Sequence[Queue], *, prefetch_count: int = 0) -> None:
        """Start receiving from ``queues`` (added to any already consumed).

        ``prefetch_count`` bounds how many messages may be held unacknowledged at
        once across this transport; 0 means no bound.
        """

    @abc.abstractmethod
    def cancel(self, queue_name: str) -> None:
        """Stop receiving from ``queue_name``; held messages stay held."""

    @abc.abstractmethod
    def set_prefetch(self, prefetch_count: int) -> None:
        """Change the prefetch bound at run time without reconnecting (0 = none)."""

    @abc.abstractmethod
    def poll(self, timeout: float | None = None) -> list[Message]:
        """Wait up to ``timeout`` seconds for messages and return those received.

        Returns an empty list when nothing arrived in time. Never returns more
        than the prefetch bound allows.

        Raises:
            ConnectionLost: the link dropped; the caller reconnects.
        """

    @abc.abstractmethod
    def ack(self, message: Message) -> None:
        """Remove a held message for good. Use ``Message.ack()`` instead."""

    def ack_many(self, messages: Sequence[Message]) -> None:
        """Ack several held messages at once (one round trip where the broker allows).

        Marks each message ACKED. The default acks them one by one.
        """
        for message in messages:
            message.ack()

    def ack_early(self, messages: Sequence[Message]) -> None:
        """Ack held messages whose tasks are about to start: the acks are written to the
        broker when this returns; the broker's confirmation may come later.

        An early ack (``acks_late`` off) promises that the task runs at most once, so the
        worker calls this before the bodies start. Once it returns, a crash of the worker
        process cannot bring the messages back (the system sends what was written), and
        ``ack_many``'s buffer for a later round trip is not used. An ack written but not
        confirmed when the link drops: where ``keeps_deliveries`` is True, ``connect()``
        writes it again before it returns; elsewhere (AMQP) it is in
        ``unconfirmed_acks()`` until the link is made again. The default suits transports
        whose ``ack_many`` is synchronous.

        Raises:
            TransportError: the acks could not be written. Where ``keeps_deliveries`` is
                True they are kept, the messages count as ACKED, and ``connect()`` writes
                the acks before it returns; elsewhere (AMQP) the broker may or may not
                have them.
        """
        self.ack_many(messages)

    @property
    def acks_from_any_thread(self) -> bool:
        """True when ``ack_early`` may be called from any thread while the consuming
        thread uses the transport (a worker's pool slots then write the early acks of the
        jobs they take). The default: no."""
        return False

    def unconfirmed_acks(self) -> list[Message]:
        """Messages of ``ack_early`` the broker has not confirmed yet, where a dropped link
        leaves them unsure (AMQP; call it before reconnecting). The default: none."""
        return []

    @abc.abstractmethod
    def reject(self, message: Message, *, requeue: bool) -> None:
        """Give a held message back (``requeue``) or drop it. Use ``Message.reject()``.

        A requeue is not a failed delivery: ``delivery_count`` does not grow.
        """

    def requeue_failed(self, message: Message) -> None:
        """Give a held message back, its delivery counted as failed (``Message.requeue_failed``).

        The default is a plain requeue: a transport that counts failed deliveries
        overrides it.
        """
        self.reject(message, requeue=True)

    def dead_letter(self, message: Message) -> str | None:
        """Settle a held message, kept in its dead-letter queue; return where it went.

        Use ``Message.dead_letter()``. The default drops it (``reject``) and returns
        None: a transport that can keep it overrides this.
        """
        self.reject(message, requeue=False)
        return None

    @property
    def maintain_interval(self) -> float:
        """How often (seconds) the consumer must call ``maintain()``.

        At most 1 s, and a quarter of the ``visibility_timeout`` option when the
        transport has one, so claims never lapse while their holder lives.
        """
        vt = self.options.get("visibility_timeout")
        if not vt:
            return 1.0
        return max(0.05, min(1.0, float(vt) / 4))

    def maintain(self) -> None:  # noqa: B027 - optional hook
        """Periodic upkeep from the consumer loop, every ``maintain_interval`` seconds.

        AMQP services heartbeats here; Redis and SQL keep the claims of held
        messages fresh and move due delayed messages to their queues.
        """

    # -- administration ---------------------------------------------------------------

    @abc.abstractmethod
    def purge(self, queue_name: str) -> int:
        """Delete every ready message of ``queue_name``; return how many."""

    @abc.abstractmethod
    def queue_size(self, queue_name: str) -> int:
        """The number of ready messages in ``queue_name`` (0 if it does not exist)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"
