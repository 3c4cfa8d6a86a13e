"""Settling: the acks, rejects and requeues of messages whose run is decided.

Early acks are not settled here: the slot that takes the job writes its ack before the
body starts (``_ack_in_slot``), or, where it cannot, the loop does before it submits the
job (``Consumer._start``); the broker's confirmation is read later. Pool threads
report late acks and the end of a job (``job.on_done``, which frees the slot) through
``Consumer.report``; what they report off the loop's thread waits on
``Consumer.completions`` until the loop drains it. Late acks go to the broker in
batches; rejects and requeues one at a time.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
from typing import TYPE_CHECKING

from taskframe import states
from taskframe.canvas.chord_completion import on_revoked
from taskframe.errors import TransportError
from taskframe.transport.base import MessageState
from taskframe.transport.errors import ConnectionLost, MessageStateError

if TYPE_CHECKING:
    from taskframe.client.app import Taskframe
    from taskframe.execution.outcome import Outcome
    from taskframe.pools.base import TaskJob
    from taskframe.transport import Connection
    from taskframe.worker.request import Request

__all__ = ["ACK", "DONE", "EARLY_ACKED", "NOT_STARTED", "REJECT", "REQUEUE", "REQUEUE_FAILED",
           "Settling"]

logger = logging.getLogger("taskframe.worker.consumer")

# What a job reports: settle its message one of three ways, or (DONE) free its slot.
ACK, REJECT, REQUEUE, DONE = "ack", "reject", "requeue", "done"
# A slot wrote a job's early ack (EARLY_ACKED), or could not and did not start it.
EARLY_ACKED, NOT_STARTED = "early_acked", "not_started"
# A requeue whose delivery failed (the process running it died): worker_delivery_limit counts.
REQUEUE_FAILED = "requeue_failed"


class Settling:
    """The ``Consumer``'s part that settles messages and counts finished jobs."""

    # The consumer's state this part reads and changes (set in ``Consumer.__init__``).
    app: Taskframe
    connection: Connection
    completions: queue.SimpleQueue[tuple[Request, str]]
    held: int
    running: int
    processed: int
    active: dict[str, Request]
    totals: collections.Counter[str]
    _totals_lock: threading.Lock
    _thread: threading.Thread
    _acks: list[Request]
    _slot_acks: threading.Lock
    _slot_acks_open: bool
    _stop: threading.Event
    reserved: collections.deque[Request]

    if TYPE_CHECKING:  # the steps of the consumer's other parts that settling needs
        def _start(self, starting: list[Request]) -> None: ...

    def settle_completions(self, first: tuple[Request, str] | None = None, *,
                           flush: bool = True) -> None:
        """Apply every action the pool reported; acks go to the broker in one batch.

        Args:
            first: an action already taken off the queue, applied with the rest.
            flush: send the acks now; otherwise they wait for ``_flush_acks`` (the
                loop's next poll). A delayed ack never loses a message: at worst a
                crash in between runs it again, as with a late ack.
        """
        acks = self._acks
        if first is not None:
            if first[1] == ACK:
                acks.append(first[0])
            else:
                self._settle(*first)
        while True:
            try:
                request, action = self.completions.get_nowait()
            except queue.Empty:
                break
            if action == ACK:
                acks.append(request)
            else:
                self._settle(request, action)
        if flush:
            self._flush_acks()

    def _flush_acks(self) -> None:
        if self._acks:
            acks, self._acks = self._acks, []
            self._ack_batch(acks)

    def _ack_batch(self, requests: list[Request]) -> None:
        transport = self.connection.transport
        current = [r for r in requests
                   if not r.message.settled and r.message.transport is transport]
        for request in requests:
            if request not in current:
                self._settle(request, ACK)  # stale or settled: handled one by one
        if not current:
            return
        try:
            transport.ack_many([r.message for r in current])
        except ConnectionLost:
            raise
        except TransportError as exc:
            logger.warning("could not ack %d message(s) at once (%s): one by one", len(current),
                           exc)
            for request in current:
                self._settle(request, ACK)
            return
        self.held -= len(current)

    def report(self, request: Request, action: str) -> None:
        """Called by jobs (any thread): settle now on the loop's thread, else queue it.

        An ack reported on the loop's thread joins the next batch instead of costing a
        round trip.
        """
        if threading.current_thread() is self._thread:
            if action == ACK:
                self._acks.append(request)
            else:
                self._settle(request, action)
        else:
            self.completions.put((request, action))

    def _settle(self, request: Request, action: str) -> None:
        if action == DONE:
            self.running -= 1
            self.processed += 1
            return
        message = request.message
        if action == EARLY_ACKED:
            if message.transport is self.connection.transport:  # else held was reset
                self.held -= 1
            return
        if action == NOT_STARTED:
            self._not_started(request)
            return
        if message.settled:
            return
        if message.transport is not self.connection.transport:
            # Received on a connection that has since dropped: the broker gives the
            # message back by itself, so settling it here would be wrong or impossible.
            # (``_reconnect`` already took it out of ``held``.)
            logger.info("not settling %r: its connection was lost", request)
            message.state = MessageState.LOST
            return
        try:
            if action == ACK:
                message.ack()
            elif action == REQUEUE:
                message.reject(requeue=True)
            elif action == REQUEUE_FAILED:
                message.requeue_failed()
            else:
                message.reject(requeue=False)
        except TransportError as exc:
            logger.warning("could not %s %r: %s", action, request, exc)
        self.held -= 1

    # -- what jobs report (any thread) ------------------------------------------------

    def _ack_in_slot(self, job: TaskJob) -> bool:
        """``job.before_start``: write the job's early ack, in the slot that took it
        (any thread); False if it must not start (the loop has it back: ``NOT_STARTED``).

        Not while the loop reconnects or stops, nor for a message of a link that
        dropped: the loop decides about those. The transport writes from any thread
        (``Transport.acks_from_any_thread``); a failed write is the loop's to handle.
        """
        request: Request = job.request
        with self._slot_acks:
            transport = self.connection.transport
            if self._slot_acks_open and not self._stop.is_set() \
                    and request.message.transport is transport:
                try:
                    transport.ack_early([request.message])
                except Exception as exc:  # the loop's to handle: a slot only reports it
                    request.start_error = exc
                else:
                    self.completions.put((request, EARLY_ACKED))
                    return True
        self.completions.put((request, NOT_STARTED))
        return False

    def _not_started(self, request: Request) -> None:
        """A slot took the job and did not start it (``_ack_in_slot``): the loop writes
        its ack itself (``ack_in_loop``), or requeues it when stopping; a write that failed
        on the current link makes the loop reconnect first."""
        self.running -= 1
        if self.active.get(request.id) is request:
            del self.active[request.id]
        message, exc = request.message, request.start_error
        request.start_error = None
        if message.state is MessageState.LOST:
            return  # AMQP, received on a dropped link: the broker gives it back
        current = message.transport is self.connection.transport
        if message.state is MessageState.ACKED and current:
            self.held -= 1  # the ack is kept and written again (Redis, SQL) or unsure (AMQP)
        request.ack_in_loop = True
        if self._stop.is_set():
            if message.state is MessageState.ACKED:  # acked: it runs, as reconnect would
                self.running += 1
                self._start([request])
            else:
                self._settle(request, REQUEUE)
            return
        self.reserved.appendleft(request)
        if isinstance(exc, TransportError) and current and not isinstance(exc, MessageStateError):
            raise exc  # the loop reconnects, then writes the ack or finds it done
        if exc is not None:
            logger.warning("%r: a slot could not write its early ack (%r); the loop does", request,
                           exc)

    def _on_accepted(self, job: TaskJob) -> None:
        """A pool slot took the job (any thread); an early ack was sent before ``submit``
        (``Consumer._start``)."""
        request: Request = job.request
        request.started = True
        with self._totals_lock:
            self.totals[request.task.name] += 1

    def total_counts(self) -> dict[str, int]:
        """Tasks accepted so far, by name (a copy; safe from any thread)."""
        with self._totals_lock:
            return dict(self.totals)

    def _on_done(self, job: TaskJob, outcome: Outcome) -> None:
        """The job ended (any thread): settle late acks, free the slot."""
        request: Request = job.request
        if outcome.state == states.REVOKED and self._store_results():  # terminated
            on_revoked(job.task, job.context, "terminated")
        try:
            if request.acks_late:
                self.report(request, self._late_action(request, outcome))
            elif outcome.state == states.REJECTED and outcome.requeue:
                logger.warning("%r asked to requeue but was acked early", request)
        finally:
            if self.active.get(request.id) is request:
                del self.active[request.id]
            self.report(request, DONE)

    def _store_results(self) -> bool:
        return self.app.result_backend_url is not None

    def _late_action(self, request: Request, outcome: Outcome) -> str:
        if outcome.state == states.REJECTED:
            if not outcome.requeue:
                return REJECT
            return REQUEUE_FAILED if outcome.delivery_failed else REQUEUE
        if outcome.state == states.FAILURE:
            task = request.task
            ack = task.acks_on_failure_or_timeout
            if ack is None:
                ack = self.app.conf.task_acks_on_failure_or_timeout
            return ACK if ack else REJECT
        return ACK
