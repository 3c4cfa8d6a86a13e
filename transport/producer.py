"""Sending: the one path every message takes to the broker.

Three steps, each in one place:

* ``envelope_of``: a body serialized (and compressed) into an ``Envelope``.
* ``publish_on``: an envelope handed to a transport the caller already holds (inside
  ``Connection.ensure``, or the loop that owns the connection). It is the only code
  that calls ``Transport.publish``.
* ``Producer``: both, on a ``Connection`` of its own: declares queues and exchanges once
  per transport (a reconnect brings a new one, and the broker may have lost non-durable
  declarations with the old link), connects when needed and, given a retry policy,
  publishes again after a dropped connection (``Connection.ensure``).

Delays: ``delay`` asks the broker to keep the message invisible for that many seconds.
Where the transport cannot delay it raises ``ImproperlyConfigured``; with
``delay_if_possible=True`` the message is sent at once instead (its receiver keeps the
ETA, as a worker does for a task message).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .base import Envelope, Transport
from .entities import Exchange, Queue
from .errors import EncodeError, ImproperlyConfigured
from .serialization import compress, dumps

if TYPE_CHECKING:
    from .connection import Connection

__all__ = ["Producer", "envelope_of", "publish_on"]

#: What ``declare=`` takes: queues (with their bindings) and exchanges.
Declarable = Queue | Exchange


def envelope_of(
    body: Any,
    *,
    serializer: str = "json",
    headers: Mapping[str, Any] | None = None,
    properties: Mapping[str, Any] | None = None,
    compression: str | None = None,
    content_type: str | None = None,
    content_encoding: str | None = None,
) -> Envelope:
    """Serialize ``body`` into an envelope.

    Args:
        body: the payload; serialized with ``serializer`` unless ``content_type`` is
            given, in which case it must be bytes (or str, encoded with
            ``content_encoding``).
        headers / properties: message headers and AMQP-style properties (copied).
        compression: a compression method (``"zlib"``, ...); its MIME type goes in the
            ``compression`` header.

    Raises:
        EncodeError: the body cannot be serialized.
    """
    if content_type is not None:
        if isinstance(body, str):
            content_encoding = content_encoding or "utf-8"
            data = body.encode(content_encoding)
        elif isinstance(body, bytes | bytearray | memoryview):
            content_encoding = content_encoding or "binary"
            data = bytes(body)
        else:
            raise EncodeError(
                f"with content_type={content_type!r} the body must be bytes or str, "
                f"not {type(body).__name__}"
            )
    else:
        content_type, content_encoding, data = dumps(body, serializer)
    all_headers = dict(headers or {})
    if compression:
        data, all_headers["compression"] = compress(data, compression)
    return Envelope(
        body=data,
        content_type=content_type,
        content_encoding=content_encoding,
        headers=all_headers,
        properties=dict(properties or {}),
    )


def publish_on(
    transport: Transport,
    envelope: Envelope,
    *,
    exchange: str,
    routing_key: str,
    delay: float | None = None,
    delay_if_possible: bool = False,
) -> None:
    """Hand ``envelope`` to ``transport``: the one call of ``Transport.publish``.

    Raises:
        ImproperlyConfigured: ``delay`` where the transport cannot delay (unless
            ``delay_if_possible``).
        PublishError / ConnectionLost: as ``Transport.publish``.
    """
    if delay:
        if delay_if_possible:
            if not transport.can_delay(exchange, routing_key):
                delay = None
        elif not transport.supports_delay:
            raise ImproperlyConfigured(
                f"{type(transport).__name__} cannot delay messages; keep the delay yourself"
            )
    transport.publish(envelope, exchange=exchange, routing_key=routing_key, delay=delay or None)


class Producer:
    """Serializes bodies and publishes them through a ``Connection``.

    One per thread, as its connection: the declarations it remembers are per transport.

    Args:
        connection: where to publish.
        serializer: the default serializer name.
        compression: the default compression method (``None``: none).
    """

    def __init__(
        self, connection: Connection, serializer: str = "json", compression: str | None = None
    ) -> None:
        self.connection = connection
        self.serializer = serializer
        self.compression = compression
        self._declared: weakref.WeakKeyDictionary[Transport, set[Declarable]] = (
            weakref.WeakKeyDictionary()
        )

    def publish(
        self,
        body: Any,
        *,
        routing_key: str,
        exchange: str = "",
        headers: Mapping[str, Any] | None = None,
        properties: Mapping[str, Any] | None = None,
        serializer: str | None = None,
        content_type: str | None = None,
        content_encoding: str | None = None,
        compression: str | None = None,
        delay: float | None = None,
        delay_if_possible: bool = False,
        priority: int | None = None,
        declare: Sequence[Declarable] = (),
        retry: bool = False,
        retry_policy: Mapping[str, Any] | None = None,
    ) -> None:
        """Publish one message.

        Args:
            body: the payload (see ``envelope_of``).
            routing_key / exchange: where it goes (``exchange=""``: the queue named
                by the routing key).
            headers / properties: message headers and AMQP-style properties.
            serializer / compression: override the producer's defaults.
            delay: seconds the broker keeps the message invisible.
            delay_if_possible: send at once where the transport cannot delay.
            priority: 0-255, larger is more urgent.
            declare: queues and exchanges to declare first (once per transport).
            retry / retry_policy: re-publish after a dropped connection (see
                ``Connection.ensure``).

        Raises:
            EncodeError: the body cannot be serialized.
            ImproperlyConfigured: ``delay`` on a transport without broker-side delay.
            BrokerConnectionError: the broker cannot be reached.
        """
        envelope = envelope_of(
            body,
            serializer=serializer or self.serializer,
            headers=headers,
            properties=properties,
            compression=compression or self.compression,
            content_type=content_type,
            content_encoding=content_encoding,
        )
        if priority is not None:
            envelope.properties["priority"] = priority
        self.send(envelope, routing_key=routing_key, exchange=exchange, delay=delay,
                  delay_if_possible=delay_if_possible, declare=declare,
                  retry=retry, retry_policy=retry_policy)

    def send(
        self,
        envelope: Envelope,
        *,
        routing_key: str,
        exchange: str = "",
        delay: float | None = None,
        delay_if_possible: bool = False,
        declare: Sequence[Declarable] = (),
        retry: bool = False,
        retry_policy: Mapping[str, Any] | None = None,
    ) -> None:
        """Publish an envelope already built (arguments as ``publish``)."""

        def send(transport: Transport) -> None:
            if declare:
                self._declare(transport, declare)
            publish_on(transport, envelope, exchange=exchange, routing_key=routing_key,
                       delay=delay, delay_if_possible=delay_if_possible)

        if retry:
            self.connection.ensure(send, retry_policy)
            return
        if not self.connection.connected:
            self.connection.connect()
        send(self.connection.transport)

    def _declare(self, transport: Transport, entities: Sequence[Declarable]) -> None:
        done = self._declared.setdefault(transport, set())
        for entity in entities:
            if entity in done:
                continue
            if isinstance(entity, Exchange):
                transport.declare_exchange(entity)
            else:
                transport.declare(entity)
            done.add(entity)
