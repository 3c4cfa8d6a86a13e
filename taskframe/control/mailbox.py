"""Celery's mailbox ("pidbox") topology, request and reply messages, and the client side.

Topology (namespace ``ns`` = the ``control_exchange`` setting, ``"celery"``):

* requests go to the fanout exchange ``<ns>.pidbox`` (non-durable); every node
  gets every request and filters itself (``destination``, ``pattern``/``matcher``);
* a node consumes ``<nodename>.<ns>.pidbox`` (non-durable, auto-delete,
  ``x-expires`` = ``control_queue_expires``, ``x-message-ttl`` = ``control_queue_ttl``);
  on Redis that is a PSUBSCRIBE, handled by the transport;
* replies go to the direct exchange ``reply.<ns>.pidbox`` with the client's
  ``oid`` as routing key, into the client's queue ``<oid>.reply.<ns>.pidbox``;
  headers ``ticket`` (the request's) and ``clock``.

``Mailbox.broadcast`` is the client: it publishes one request and collects the
replies until ``timeout`` or until ``limit`` replies came.
"""

from __future__ import annotations

import fnmatch
import logging
import re
import time
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from taskframe.clock import LamportClock
from taskframe.transport import Exchange, Message, Queue
from taskframe.transport.errors import PublishError, TransportError
from taskframe.transport.producer import envelope_of, publish_on
from taskframe.transport.serialization import MAX_BODY_SIZE

if TYPE_CHECKING:
    from taskframe.client.app import Taskframe
    from taskframe.transport import Connection, Transport

__all__ = ["ControlRequest", "LamportClock", "Mailbox", "Reply", "mailbox_for", "node_matches"]

logger = logging.getLogger("taskframe.control.mailbox")

#: One node's reply: ``{nodename: value}``.
Reply = dict[str, Any]

DEFAULT_TIMEOUT = 1.0


def node_matches(hostname: str, destination: Collection[str] | None,
                 pattern: str | None, matcher: str | None) -> bool:
    """Whether a request addressed this way is for ``hostname`` (Celery's node filter)."""
    if destination:
        return hostname in destination
    if pattern and matcher:
        if matcher == "pcre":
            return re.search(pattern, hostname) is not None
        return fnmatch.fnmatch(hostname, pattern)
    return True


@dataclass
class ControlRequest:
    """One mailbox request as it travels (the body of a pidbox message)."""

    method: str
    arguments: dict[str, Any] = field(default_factory=dict)
    destination: list[str] | None = None
    pattern: str | None = None
    matcher: str | None = None
    ticket: str | None = None
    reply_to: dict[str, str] | None = None

    @classmethod
    def from_body(cls, body: Any) -> ControlRequest:
        """Read a decoded body; raises ``ValueError`` when it is not a request."""
        if not isinstance(body, Mapping) or not isinstance(body.get("method"), str):
            raise ValueError(f"not a control request: {body!r}")
        arguments = body.get("arguments") or {}
        if not isinstance(arguments, Mapping):
            raise ValueError(f"control request arguments must be an object: {arguments!r}")
        destination = body.get("destination")
        reply_to = body.get("reply_to")
        return cls(
            method=body["method"],
            arguments=dict(arguments),
            destination=list(destination) if destination else None,
            pattern=body.get("pattern"),
            matcher=body.get("matcher"),
            ticket=body.get("ticket"),
            reply_to=dict(reply_to) if isinstance(reply_to, Mapping) else None,
        )

    def to_body(self) -> dict[str, Any]:
        """The body Celery sends (``ticket``/``reply_to`` only when a reply is wanted)."""
        body: dict[str, Any] = {
            "method": self.method, "arguments": self.arguments,
            "destination": self.destination, "pattern": self.pattern, "matcher": self.matcher,
        }
        if self.ticket:
            body["ticket"] = self.ticket
            body["reply_to"] = self.reply_to
        return body

    def is_for(self, hostname: str) -> bool:
        """Whether ``hostname`` must handle this request."""
        return node_matches(hostname, self.destination, self.pattern, self.matcher)


class Mailbox:
    """The pidbox exchanges and queues of one namespace, and the client's broadcast.

    Args:
        namespace: the ``control_exchange`` setting.
        queue_ttl / queue_expires: seconds (``control_queue_ttl`` / ``control_queue_expires``).
        serializer / accept: how requests are written and which replies are read.
        max_size: the most bytes a request or reply may have, as received or decompressed
            (``worker_max_message_size``; ``None``: no bound).
    """

    def __init__(self, namespace: str = "celery", *, queue_ttl: float | None = 300.0,
                 queue_expires: float | None = 10.0, serializer: str = "json",
                 accept: Collection[str] = ("json",), clock: LamportClock | None = None,
                 max_size: int | None = MAX_BODY_SIZE) -> None:
        self.namespace = namespace
        self.max_size = max_size
        self.queue_ttl = queue_ttl
        self.queue_expires = queue_expires
        self.serializer = serializer
        self.accept = tuple(accept)
        self.clock = clock or LamportClock()
        self.exchange = Exchange(f"{namespace}.pidbox", "fanout", durable=False)
        self.reply_exchange = Exchange(f"reply.{namespace}.pidbox", "direct", durable=False)

    def _queue_arguments(self) -> dict[str, Any]:
        arguments: dict[str, Any] = {}
        if self.queue_expires:
            arguments["x-expires"] = int(self.queue_expires * 1000)
        if self.queue_ttl:
            arguments["x-message-ttl"] = int(self.queue_ttl * 1000)
        return arguments

    def node_queue(self, hostname: str) -> Queue:
        """The queue node ``hostname`` consumes requests from."""
        return Queue(f"{hostname}.{self.namespace}.pidbox", self.exchange, routing_key="",
                     durable=False, auto_delete=True, arguments=self._queue_arguments())

    def reply_queue(self, oid: str) -> Queue:
        """The queue a client with ``oid`` collects replies in."""
        return Queue(f"{oid}.{self.reply_exchange.name}", self.reply_exchange, routing_key=oid,
                     durable=False, auto_delete=True, arguments=self._queue_arguments())

    # -- node side -------------------------------------------------------------------

    def send_reply(self, transport: Transport, request: ControlRequest, reply: Reply) -> None:
        """Publish ``reply`` to the client that sent ``request`` (dropped when it is gone)."""
        if not request.ticket or not request.reply_to:
            return
        exchange = str(request.reply_to.get("exchange") or self.reply_exchange.name)
        routing_key = str(request.reply_to.get("routing_key") or "")
        envelope = envelope_of(
            reply, serializer="json",
            headers={"ticket": request.ticket, "clock": self.clock.forward()},
            properties={"delivery_mode": 1, "correlation_id": request.ticket},
        )
        transport.declare_exchange(Exchange(exchange, "direct", durable=False))
        try:
            publish_on(transport, envelope, exchange=exchange, routing_key=routing_key)
        except PublishError as exc:
            logger.debug("reply to %s dropped (client gone?): %s", routing_key, exc)

    # -- client side -----------------------------------------------------------------

    def broadcast(
        self,
        connection: Connection,
        method: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        destination: Sequence[str] | None = None,
        pattern: str | None = None,
        matcher: str | None = None,
        reply: bool = True,
        timeout: float | None = DEFAULT_TIMEOUT,
        limit: int | None = None,
        oid: str | None = None,
        callback: Callable[[Reply], None] | None = None,
    ) -> list[Reply]:
        """Send ``method`` to every node (or those addressed) and collect the replies.

        Args:
            connection: a broker connection (connected here when needed).
            destination: node names; the collection stops after that many replies.
            pattern / matcher: address nodes by a glob (``matcher="glob"``) or a regex
                (``"pcre"``) instead.
            reply: wait for replies; ``False`` returns ``[]`` at once.
            timeout: seconds to collect replies.
            limit: stop after this many replies.
            oid: the reply queue's routing key (one per client; a fresh one when None).
            callback: called with each reply as it comes.

        Returns:
            The replies, ``[{nodename: value}, ...]``; empty when no node answered.
        """
        if destination is not None and isinstance(destination, str):
            raise ValueError("destination must be a list of node names, not a string")
        if limit is None and destination:
            limit = len(destination)
        request = ControlRequest(
            method=method, arguments=dict(arguments or {}),
            destination=list(destination) if destination else None,
            pattern=pattern, matcher=matcher,
        )
        if not connection.connected:
            connection.connect()
        transport = connection.transport
        reply_queue = self._listen(transport, request, oid) if reply else None
        try:
            if not self._publish_request(transport, request, timeout):
                return []
            if reply_queue is None or request.ticket is None:
                return []
            return self._collect(transport, request.ticket, timeout, limit, callback)
        finally:
            if reply_queue is not None:
                try:
                    transport.cancel(reply_queue.name)
                except TransportError as exc:
                    logger.debug("cancelling %s: %s", reply_queue.name, exc)

    def _listen(self, transport: Transport, request: ControlRequest, oid: str | None) -> Queue:
        """Consume the reply queue of client ``oid`` (a new one when None); address replies
        of ``request`` to it."""
        oid = oid or uuid.uuid4().hex
        reply_queue = self.reply_queue(oid)
        request.ticket = str(uuid.uuid4())
        request.reply_to = {"exchange": self.reply_exchange.name, "routing_key": oid}
        transport.consume([reply_queue], prefetch_count=0)
        return reply_queue

    def _publish_request(self, transport: Transport, request: ControlRequest,
                         timeout: float | None) -> bool:
        envelope = envelope_of(
            request.to_body(), serializer=self.serializer,
            headers={"clock": self.clock.forward(),
                     "expires": time.time() + timeout if timeout else 0},
            properties={"delivery_mode": 2},
        )
        transport.declare_exchange(self.exchange)
        try:
            publish_on(transport, envelope, exchange=self.exchange.name, routing_key="")
        except PublishError as exc:
            # AMQP returns a request no queue is bound for: no node is listening.
            logger.debug("control request %s reached no node: %s", request.method, exc)
            return False
        return True

    def _collect(self, transport: Transport, ticket: str, timeout: float | None,
                 limit: int | None, callback: Callable[[Reply], None] | None) -> list[Reply]:
        replies: list[Reply] = []
        deadline = time.monotonic() + (DEFAULT_TIMEOUT if timeout is None else timeout)
        while limit is None or len(replies) < limit:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for message in transport.poll(remaining):
                body = self._read_reply(message, ticket)
                if body is None:
                    continue
                replies.append(body)
                if callback is not None:
                    callback(body)
        return replies

    def _read_reply(self, message: Message, ticket: str) -> Reply | None:
        try:
            message.ack()
        except TransportError as exc:
            logger.debug("ack of a reply failed: %s", exc)
        self.clock.adjust(message.headers.get("clock"))
        if message.headers.get("ticket", ticket) != ticket:
            return None  # a late reply to an earlier request of this client
        try:
            body = message.decode(self.accept, self.max_size)
        except TransportError as exc:
            logger.warning("unreadable control reply: %s", exc)
            return None
        if not isinstance(body, dict):
            logger.warning("control reply is not an object: %r", body)
            return None
        return body


def mailbox_for(app: Taskframe, clock: Any = None) -> Mailbox:
    """The mailbox the app's settings describe (``control_exchange``, ``control_queue_*``)."""
    c = app.conf
    return Mailbox(
        str(c.control_exchange or "celery"),
        queue_ttl=c.control_queue_ttl, queue_expires=c.control_queue_expires,
        serializer=str(c.task_serializer or "json"),
        accept=tuple(c.accept_content or ("json",)), clock=clock,
        max_size=int(c.worker_max_message_size or 0) or None,
    )
