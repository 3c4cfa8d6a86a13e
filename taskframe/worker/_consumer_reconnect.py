"""Reconnection: consuming from the queues, and again after the broker link drops.

On connection loss the consumer's queues of waiting requests are emptied and the
connection is made again with backoff; then the queues are declared and consumed
again at the base prefetch bound. What happens to the messages received on the old
link depends on the transport (``Connection.reconnect``): on Redis and SQL they are
still held (a claim in the broker's data outlives the socket), so running tasks keep
theirs and settle them as usual, and the waiting ones are given back at once; on
AMQP the broker delivers them again by itself, so they are marked lost (tasks still
running finish, their late acks are skipped). An early-ack request whose ack could
not be written, or was written and not confirmed (``Transport.unconfirmed_acks``),
when the link dropped may be acked or not: on Redis and SQL ``connect()`` writes it
again, and the task runs (once); on AMQP it runs too, and a copy the broker gives back
(it had not got the ack) is acked without running (``unsure``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from taskframe.protocol import decode_message
from taskframe.transport.base import MessageState
from taskframe.worker._consumer_settle import REQUEUE

if TYPE_CHECKING:
    import collections
    import threading

    from taskframe.client.app import Taskframe
    from taskframe.transport import Connection, Message, Queue
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
    reconnecting: bool
    unsure: set[str]
    _slot_acks: threading.Lock
    _slot_acks_open: bool
    accept: tuple[str, ...]

    if TYPE_CHECKING:  # the steps of the consumer's other parts that reconnection needs
        def _take_back(self) -> list[Request]: ...
        def _settle(self, request: Request, action: str) -> None: ...

    def start_consuming(self) -> None:
        """Declare the queues and start receiving from them."""
        transport = self.connection.transport
        for q in self.queues:
            transport.declare(q)
        self._qos = self.prefetch_count
        transport.consume(self.queues, prefetch_count=self.prefetch_count)

    def _reconnect(self, exc: Exception) -> None:
        logger.error("Connection to broker lost: %s. Reconnecting...", exc)
        with self._slot_acks:  # no slot writes an early ack until this is done
            self._slot_acks_open = False
            # Early acks written and not confirmed when the link dropped (AMQP).
            unconfirmed = self.connection.transport.unconfirmed_acks()
        try:
            self._reconnect_and_sort(unconfirmed)
        finally:
            self._slot_acks_open = True

    def _reconnect_and_sort(self, unconfirmed: list[Message]) -> None:
        waiting = self._take_back() + [r for _, _, r in self.timers + self.limited] \
            + list(self.reserved)
        self.timers.clear()
        self.limited.clear()
        self.reserved.clear()
        self.reconnecting = True  # not a wedge (``watchdog``): the loop waits on purpose
        try:
            kept = self.connection.reconnect(
                max_retries=self.app.conf.broker_connection_max_retries,
                on_error=lambda err, wait: logger.warning(
                    "Broker unreachable: %s. Trying again in %.1f s", err, wait),
            )
        finally:
            self.reconnecting = False
        # Early-ack requests whose ack was sent as they were about to start (``_start``).
        acked = [r for r in waiting if r.message.state is MessageState.ACKED]
        if kept:
            # Redis, SQL: the deliveries are still ours. Running tasks keep theirs (their
            # acks go as usual); the ones not started go back to their queues now, for
            # any consumer (their claims may have lapsed while the link was down). The
            # acked ones run now: ``connect()`` wrote their acks before it returned.
            for request in waiting:
                if request not in acked:
                    self._settle(request, REQUEUE)
        else:
            # AMQP: the broker gives back what was received on the dropped link by itself.
            # Forget it (running tasks still finish; their late acks are skipped).
            for request in waiting + list(self.active.values()):
                if not request.message.settled:
                    request.message.state = MessageState.LOST
            self.held = 0
            if acked:
                # Acked, or back in their queues: nobody can tell which. They run now; a
                # copy the broker gives back to this worker is acked, not run (``unsure``).
                self.unsure.update(r.id for r in acked)
                logger.warning(
                    "%d early-ack task(s) whose acks the broker may not have got (the link "
                    "dropped before it confirmed them): they run now, and a copy given back "
                    "to this worker is acked without running: %s",
                    len(acked), ", ".join(f"{r.name}[{r.id}]" for r in acked))
            self._unsure_of(unconfirmed)
        self.start_consuming()
        self.reserved.extend(acked)
        logger.info("Reconnected to %s", self.connection.safe_url())

    def _unsure_of(self, unconfirmed: list[Message]) -> None:
        """Tasks started (running or done) whose early acks the broker had not confirmed
        when the link dropped: a copy it gives back to this worker is acked, not run
        again (``unsure``)."""
        ids = [task_id for task_id in map(self._task_id, unconfirmed)
               if task_id and task_id not in self.unsure]
        if ids:
            self.unsure.update(ids)
            logger.warning(
                "%d early-ack task(s) started whose acks the broker had not confirmed when "
                "the link dropped: a copy given back to this worker is acked without "
                "running: %s", len(ids), ", ".join(ids))

    def _task_id(self, message: Message) -> str | None:
        """The task id of a task message received here (protocol 2: a header; 1: the body)."""
        task_id = message.headers.get("id")
        if task_id:
            return str(task_id)
        try:
            return str(decode_message(message, self.accept).id)
        except Exception:  # not a task message: it never started
            return None
