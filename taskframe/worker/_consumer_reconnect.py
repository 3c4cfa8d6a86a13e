"""Reconnection: consuming from the queues, and again after the broker link drops.

On connection loss every message received on the old link is marked lost (the
broker delivers it again; tasks still running finish, their late acks are
skipped), the consumer's queues of waiting requests are emptied, and the
connection is made again with backoff; then the queues are declared and
consumed again at the base prefetch bound.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

from taskframe.errors import TransportError
from taskframe.transport.base import MessageState

if TYPE_CHECKING:
    import collections

    from taskframe.client.app import Taskframe
    from taskframe.transport import Connection, Queue
    from taskframe.worker.request import Request

__all__ = ["Reconnection"]

logger = logging.getLogger("taskframe.worker.consumer")


class Reconnection:
    """The ``Consumer``'s part that (re)starts consuming on its connection."""

    # The consumer's state this part reads and changes (set in ``Consumer.__init__``).
    app: Taskframe
    connection: Connection
    queues: list[Queue]
    prefetch_count: int
    _qos: int
    held: int
    reserved: collections.deque[Request]
    timers: list[tuple[float, int, Request]]
    limited: list[tuple[float, int, Request]]
    active: dict[str, Request]

    if TYPE_CHECKING:  # the step of the consumer's other parts that reconnection needs
        def _take_back(self) -> list[Request]: ...

    def start_consuming(self) -> None:
        """Declare the queues and start receiving from them."""
        transport = self.connection.transport
        for q in self.queues:
            transport.declare(q)
        self._qos = self.prefetch_count
        transport.consume(self.queues, prefetch_count=self.prefetch_count)

    def _reconnect(self, exc: Exception) -> None:
        logger.error("Connection to broker lost: %s. Reconnecting...", exc)
        # Messages received on the dropped connection come back from the broker: forget
        # them (running tasks still finish; their late acks are skipped).
        pending = self._take_back() + [r for _, _, r in self.timers + self.limited] \
            + list(self.reserved) + list(self.active.values())
        for request in pending:
            if not request.message.settled:
                request.message.state = MessageState.LOST
        self.held = 0
        self.timers.clear()
        self.limited.clear()
        self.reserved.clear()
        with contextlib.suppress(TransportError):
            self.connection.close()
        self.connection.ensure_connection(
            max_retries=self.app.conf.broker_connection_max_retries,
            on_error=lambda err, wait: logger.warning(
                "Broker unreachable: %s. Trying again in %.1f s", err, wait),
        )
        self.start_consuming()
        logger.info("Reconnected to %s", self.connection.safe_url())
