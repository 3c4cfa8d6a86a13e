"""``ControlNode``: a worker's end of the mailbox, on its own connection and thread.

The node consumes ``<hostname>.<ns>.pidbox`` on a broker connection of its own,
so remote control answers while the consumer loop is busy or its prefetch
bound is reached (``inspect active`` matters most exactly then). Handlers see
the worker only through ``WorkerState``, whose implementation hands anything
touching the consuming connection to the consumer loop.

``handle(message)`` can also be called by a consumer that receives pidbox
messages itself (``queue()`` names the queue to consume).

Broadcasts sent while the node's link is down never reach it (the pidbox queue is
auto-deleted on AMQP, a fanout on Redis has only live subscribers): after it
reconnects the node calls ``on_reconnect`` (the worker catches up on revokes there).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from taskframe.control.mailbox import ControlRequest, mailbox_for
from taskframe.control_server.handlers import NO_REPLY, dispatch
from taskframe.transport.errors import TransportError

if TYPE_CHECKING:
    from collections.abc import Callable

    from taskframe.client.app import Taskframe
    from taskframe.control_server.contract import WorkerState
    from taskframe.transport import Connection, Message, Queue, Transport

__all__ = ["ControlNode"]

logger = logging.getLogger("taskframe.control.node")

_POLL = 0.5
# Seconds between two attempts to make the link again.
_RETRY = 2.0


class ControlNode:
    """Answers mailbox requests addressed to ``state.hostname``.

    Args:
        app: the worker's app (broker connection settings).
        state: the worker as handlers see it.
        on_reconnect: called (in the node's thread) each time the link is back.
    """

    def __init__(self, app: Taskframe, state: WorkerState,
                 on_reconnect: Callable[[], None] | None = None) -> None:
        self.app = app
        self.state = state
        self.on_reconnect = on_reconnect
        self.hostname = state.hostname
        self.mailbox = mailbox_for(app, state.clock)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._connection: Connection | None = None
        self._reconnected_at = 0.0

    def queue(self) -> Queue:
        """The pidbox queue of this node."""
        return self.mailbox.node_queue(self.hostname)

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> bool:
        """Connect and start answering in a daemon thread.

        Returns:
            False when the broker has no fanout exchanges (remote control off).

        Raises:
            BrokerConnectionError: the broker cannot be reached now.
        """
        connection = self.app.connection(self.app.conf.broker_read_url or None)
        if not connection.transport.supports_fanout:
            logger.warning("remote control is not available on %s (no fanout exchanges)",
                           connection.safe_url())
            return False
        connection.ensure_connection(max_retries=0)
        connection.transport.consume([self.queue()], prefetch_count=0)
        self._connection = connection
        self._thread = threading.Thread(target=self._run, name="taskframe-control",
                                        daemon=True)
        self._thread.start()
        return True

    def stop(self, timeout: float = 2.0) -> None:
        """Stop answering and close the connection."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()

    # -- the loop ---------------------------------------------------------------------

    def _run(self) -> None:
        maintained = 0.0
        while not self._stop.is_set():
            connection = self._connection
            if connection is None:
                return
            try:
                transport = connection.transport
                for message in transport.poll(_POLL):
                    self.handle(message, transport)
                if time.monotonic() - maintained >= transport.maintain_interval:
                    maintained = time.monotonic()
                    transport.maintain()  # heartbeats (AMQP), binding refresh (Redis)
            except TransportError as exc:
                if self._stop.is_set():
                    return
                # An error here is the link's, not one message's (``handle`` deals with
                # those): left as it is, a subscribe the broker refused (Redis NOPERM,
                # LOADING) would leave the node deaf for good. The link is made again.
                self._reconnect(connection, exc)

    def _reconnect(self, connection: Connection, exc: Exception) -> None:
        logger.warning("remote control lost the broker (%s); reconnecting", exc)
        connection.close()
        if time.monotonic() - self._reconnected_at < _RETRY:
            self._stop.wait(_RETRY)  # failed again at once: no busy loop
        while not self._stop.is_set():
            try:
                connection.ensure_connection(max_retries=0)
                connection.transport.consume([self.queue()], prefetch_count=0)
            except TransportError as err:  # a refused subscribe too: the thread lives on
                logger.debug("remote control: still no broker: %s", err)
                connection.close()
                self._stop.wait(_RETRY)
                continue
            self._reconnected_at = time.monotonic()
            logger.info("remote control reconnected")
            if self.on_reconnect is not None:
                self.on_reconnect()
            return

    # -- one message ------------------------------------------------------------------

    def handle(self, message: Message, transport: Transport | None = None) -> Any:
        """Settle, decode and answer one pidbox message; return the reply value sent.

        Returns ``None`` when the request was not for this node or needs no reply.
        """
        transport = transport or message.transport
        try:
            message.ack()
        except TransportError as exc:
            logger.debug("ack of a control message failed: %s", exc)
        self.state.clock.adjust(message.headers.get("clock"))
        try:
            request = ControlRequest.from_body(message.decode(self.mailbox.accept,
                                                              self.mailbox.max_size))
        except (TransportError, ValueError) as exc:
            logger.warning("unreadable control message dropped: %s", exc)
            return None
        if not request.is_for(self.hostname):
            return None
        logger.debug("remote control: %s %r", request.method, request.arguments)
        value = dispatch(self.state, request.method, request.arguments)
        if value is NO_REPLY:
            return None
        try:
            self.mailbox.send_reply(transport, request, {self.hostname: value})
        except TransportError as exc:
            logger.warning("remote control: could not reply to %s: %s", request.method, exc)
        return value
