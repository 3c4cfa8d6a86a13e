"""Timers and limits: requests that must wait before they may start.

Two heaps of ``(due, seq, request)``: ``timers`` holds ETAs not reached yet,
``limited`` runs waiting for a rate-limit token. When due they join the
consumer's ``reserved`` queue. An ETA further away than ``LOCAL_ETA_WINDOW``
goes back to a broker that can delay it, so the worker never holds far-future
messages in memory.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from typing import TYPE_CHECKING

from taskframe.transport.errors import BrokerConnectionError, TransportError
from taskframe.transport.producer import publish_on
from taskframe.worker._consumer_settle import ACK

if TYPE_CHECKING:
    import collections

    from taskframe.client.app import Taskframe
    from taskframe.transport import Connection, Message
    from taskframe.worker.ratelimit import RateLimits
    from taskframe.worker.request import Request

__all__ = ["LOCAL_ETA_WINDOW", "Timers"]

# Messages due within this many seconds wait in memory; later ones go back to a
# broker that can delay them, so the worker never sits on far-future ETAs.
LOCAL_ETA_WINDOW = 2.0


logger = logging.getLogger("taskframe.worker.consumer")

class Timers:
    """The ``Consumer``'s part that holds requests until their ETA or rate limit allows."""

    # The consumer's state this part reads and changes (set in ``Consumer.__init__``).
    app: Taskframe
    connection: Connection
    reserved: collections.deque[Request]
    timers: list[tuple[float, int, Request]]
    limited: list[tuple[float, int, Request]]
    rate_limits: RateLimits
    disable_rate_limits: bool
    _seq: itertools.count[int]

    if TYPE_CHECKING:  # the step of the consumer's other parts that deferral ends with
        def _settle(self, request: Request, action: str) -> None: ...

    def _start_due_timers(self) -> None:
        now = time.monotonic()
        for heap in (self.timers, self.limited):
            while heap and heap[0][0] <= now:
                _, _, request = heapq.heappop(heap)
                self.reserved.append(request)

    # -- far-future ETAs --------------------------------------------------------------

    def _can_defer(self, message: Message) -> bool:
        exchange, routing_key = _origin(message)
        return bool(routing_key) and self.connection.transport.can_delay(exchange, routing_key)

    def _defer(self, request: Request, delay: float) -> None:
        """Give a far-future ETA message back to the broker, delayed; then ack the original.

        A broker that refuses the delayed copy (a nack, a delay over its limit) leaves the
        original held here, in the timers, as for a broker that cannot delay; a lost
        connection is the loop's to handle (the original comes back by itself).
        """
        exchange, routing_key = _origin(request.message)
        try:
            publish_on(self.connection.transport, request.message.to_envelope(),
                       exchange=exchange, routing_key=routing_key, delay=delay)
        except BrokerConnectionError:
            raise
        except TransportError as exc:
            logger.warning("Task %s[%s]: the broker refused its delayed copy (%s); its ETA "
                           "is kept here", request.name, request.id, exc)
            heapq.heappush(self.timers, (time.monotonic() + delay, next(self._seq), request))
            return
        self._settle(request, ACK)

    # -- rate limits ------------------------------------------------------------------

    def _rate_limit_wait(self, request: Request) -> float:
        if self.disable_rate_limits:
            return 0.0
        task = request.task
        default = task.rate_limit if task.rate_limit is not None \
            else self.app.conf.task_default_rate_limit
        return self.rate_limits.delay(task.name, default)

    def set_rate_limit(self, task_name: str, limit: str | float | None) -> None:
        """Change a task's rate limit now (control ``rate_limit``); None or 0 removes it.

        Runs of that task waiting for a token are looked at again under the new limit.
        """
        self.rate_limits.set(task_name, limit)
        waiting = [entry for entry in self.limited if entry[2].task.name == task_name]
        if waiting:
            self.limited = [entry for entry in self.limited if entry[2].task.name != task_name]
            heapq.heapify(self.limited)
            self.reserved.extend(request for _, _, request in sorted(waiting))


def _origin(message: Message) -> tuple[str, str]:
    """Where to send a message again so it reaches the queue it came from.

    The queue itself through the default exchange when the transport says which
    queue it was; otherwise the exchange and routing key it was published with.
    """
    info = message.delivery_info
    queue = info.get("queue")
    if queue:
        return "", str(queue)
    return str(info.get("exchange") or ""), str(info.get("routing_key") or "")
