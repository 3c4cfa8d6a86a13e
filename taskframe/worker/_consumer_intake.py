"""Intake: one received message becomes a reserved ``Request``, or is turned away.

A message delivered more than ``worker_delivery_limit`` times without being settled is
stopped first (``delivery_limit``: FAILURE stored off the loop, then dead-lettered).
A message is decoded; one that cannot be (content type refused, bad body,
invalid task message) or names an unknown task is rejected with one log line.
An expired or revoked request is skipped (REVOKED stored, then acked; the store
write runs off the loop's thread, ``_store_writes``). An ETA far in
the future goes back to the broker, a near one waits on a timer; the rest is
reserved and started at once if the pool has room. The expired/revoked checks
run again just before a reserved request starts, and the revoked check once more when
a pool slot takes the job (``_accept``).
"""

from __future__ import annotations

import heapq
import logging
import time
from typing import TYPE_CHECKING

from taskframe import signals
from taskframe.canvas.chord_completion import on_revoked
from taskframe.errors import (
    ContentDisallowed,
    DecodeError,
    InvalidTaskError,
    NotRegistered,
    TransportError,
)
from taskframe.execution.revoked import REVOKED
from taskframe.protocol import decode_message
from taskframe.transport.base import MessageState
from taskframe.worker._consumer_settle import ACK
from taskframe.worker._consumer_timers import LOCAL_ETA_WINDOW
from taskframe.worker.delivery_limit import Stop, over_limit
from taskframe.worker.request import Request

if TYPE_CHECKING:
    import collections
    import itertools

    from taskframe.client.app import Taskframe
    from taskframe.control.revoked import RevokedSet
    from taskframe.pools.base import TaskJob
    from taskframe.transport import Connection, Message
    from taskframe.worker._store_writes import StoreWrites

__all__ = ["Intake"]

logger = logging.getLogger("taskframe.worker.consumer")


class Intake:
    """The ``Consumer``'s part that receives, checks and reserves messages."""

    # The consumer's state this part reads and changes (set in ``Consumer.__init__``).
    app: Taskframe
    accept: tuple[str, ...]
    hostname: str
    held: int
    revoked: RevokedSet | None
    timers: list[tuple[float, int, Request]]
    max_message_size: int | None
    delivery_limit: int | None
    reserved: collections.deque[Request]
    store_writes: StoreWrites
    connection: Connection
    unsure: set[str]
    _seq: itertools.count[int]

    if TYPE_CHECKING:  # the steps of the consumer's other parts that intake leads to
        def _settle(self, request: Request, action: str) -> None: ...
        def _can_defer(self, message: Message) -> bool: ...
        def _defer(self, request: Request, delay: float) -> None: ...
        def _start_reserved(self) -> None: ...
        def _on_accepted(self, job: TaskJob) -> None: ...

    def on_message(self, message: Message) -> None:
        """Decode, validate and reserve one message (or reject it with one log line)."""
        if over_limit(message, self.delivery_limit):  # its runs keep losing their process
            return self._stop_over_limit(message)
        try:
            tm = decode_message(message, self.accept, self.max_message_size)
        except ContentDisallowed as exc:
            return self._discard(message, f"content type refused ({exc}); accept_content is "
                                 f"{list(self.accept)}")
        except DecodeError as exc:
            return self._discard(message, f"body cannot be decoded: {exc}")
        except InvalidTaskError as exc:
            return self._discard(message, f"invalid task message: {exc}")
        task = self.app.tasks.get(tm.name)
        if task is None:
            return self._unknown_task(message, tm.name, tm.id)
        acks_late = task.acks_late if task.acks_late is not None else self.app.conf.task_acks_late
        request = Request(message, tm, task, hostname=self.hostname, acks_late=bool(acks_late))
        if self.unsure and tm.id in self.unsure and message.delivery_info.get("redelivered"):
            self.unsure.discard(tm.id)  # its early ack did not reach the broker; it ran here
            logger.info("Task %s[%s]: a copy of a task already run here (its ack was lost "
                        "with the link): acked, not run", request.name, request.id)
            return self._settle(request, ACK)
        logger.info("Task %s[%s] received", request.name, request.id)
        signals.task_received.send(sender=self, request=request.context)
        if request.expired():
            return self._revoke_expired(request)
        if self._is_revoked(request):
            return self._discard_revoked(request)
        delay = request.eta_delay()
        if delay > LOCAL_ETA_WINDOW and self._can_defer(message):
            return self._defer(request, delay)
        if delay > 0:
            heapq.heappush(self.timers, (time.monotonic() + delay, next(self._seq), request))
            return None
        self.reserved.append(request)
        self._start_reserved()
        return None

    def _discard(self, message: Message, reason: str) -> None:
        logger.error(
            "Rejected message (delivery_tag=%r, routing_key=%r, content_type=%r, headers=%r): %s",
            message.delivery_tag, message.delivery_info.get("routing_key"),
            message.content_type, {k: message.headers.get(k) for k in ("id", "task")}, reason,
        )
        self._settle_message(message, requeue=False)

    def _settle_message(self, message: Message, *, requeue: bool) -> None:
        if message.transport is not self.connection.transport:
            message.state = MessageState.LOST  # its link dropped: the broker gives it back
            return
        try:
            message.reject(requeue=requeue)
        except TransportError as exc:
            logger.warning("could not reject %r: %s", message, exc)
        self.held -= 1

    def _unknown_task(self, message: Message, name: str, task_id: str) -> None:
        logger.error(
            "Received unregistered task of type %r (id %s): rejected. Is the module that "
            "defines it imported by the worker (-A, include, imports)?", name, task_id,
        )
        exc = NotRegistered(name)
        signals.task_unknown.send(sender=self, name=name, id=task_id, message=message, exc=exc)
        if self.app.result_backend_url is None:
            return self._settle_message(message, requeue=False)

        def write() -> None:  # on the store thread (``_store_writes``)
            try:
                self.app.backend.mark_as_failure(task_id, exc)
            except Exception:
                logger.exception("could not store NotRegistered for %s", task_id)

        self.store_writes.submit(write, lambda: self._settle_message(message, requeue=False))
        return None

    def _stop_over_limit(self, message: Message) -> None:
        """Not run, over ``worker_delivery_limit``: FAILURE stored, then dead-lettered."""
        stop = Stop(self.app, message, limit=self.delivery_limit or 0, accept=self.accept,
                    max_size=self.max_message_size, hostname=self.hostname)
        if self.app.result_backend_url is None:
            return self._dead_letter(stop)
        self.store_writes.submit(stop.store_failure, lambda: self._dead_letter(stop))
        return None

    def _dead_letter(self, stop: Stop) -> None:
        if stop.message.transport is not self.connection.transport:
            stop.message.state = MessageState.LOST  # its link dropped: the broker gives it back
            return
        stop.dead_letter()
        self.held -= 1

    # -- expired and revoked: checked at receive and again before a run ---------------

    def _revoke_expired(self, request: Request) -> None:
        logger.info("Task %s[%s] expired: not run", request.name, request.id)
        self._skip(request, "expired")

    def _is_revoked(self, request: Request) -> bool:
        revoked = self.revoked
        if revoked is None:
            return False
        return request.id in revoked or revoked.matches_stamps(request.context.stamps)

    def _accept(self, job: TaskJob) -> None:
        """A pool slot takes ``job`` (``job.on_accepted``, any thread): the last look at the
        revoked set, then the early ack.

        Pools hold jobs ahead of a free slot (``queue_ahead``) and greenlets, coroutines
        and children start a moment after ``submit``: a revoke that landed meanwhile asks
        the run to abort with reason "revoked" before its body starts, so ``execute``
        stores REVOKED and runs nothing (``execution.revoked``). One set lookup per task.
        """
        if self.revoked is not None and self._is_revoked(job.request):
            job.context.request_abort(REVOKED)
        self._on_accepted(job)

    def _discard_revoked(self, request: Request) -> None:
        """Skip a revoked task: store REVOKED (never over a result), signal, ack."""
        logger.info("Discarding revoked task: %s[%s]", request.name, request.id)
        self._skip(request, "revoked")

    def _skip(self, request: Request, reason: str) -> None:
        """Store REVOKED with ``reason`` and count a chord part, signal, ack: not run.

        A result store that is down does not keep the message: it is settled all the same.
        The write runs on the store thread and the ack follows it (``_store_writes``).
        """
        signals.task_revoked.send(sender=request.task, request=request.context,
                                  terminated=False, signum=None, expired=reason == "expired")
        if self.app.result_backend_url is None:
            return self._settle(request, ACK)

        def write() -> None:  # on the store thread
            try:
                if not request.context.ignore_result:
                    self.app.backend.mark_as_revoked(request.id, reason)
                on_revoked(request.task, request.context, reason)  # a chord part counts
            except Exception as exc:
                logger.warning("could not store REVOKED (%s) for %s: %r", reason, request.id,
                               exc)

        self.store_writes.submit(write, lambda: self._settle(request, ACK))
        return None
