"""The delivery limit: a message whose runs keep killing the process running them stops.

A task that crashes its prefork child (a segfault in a C extension, the OOM killer,
``os._exit``) with ``acks_late`` and ``reject_on_worker_lost`` is requeued each time,
and a message whose run kills the whole worker comes back when its holder's claim
lapses: Celery runs such a message forever, and each run may take a worker down.

The transports count the deliveries of a message that ended without a settle
(``Message.delivery_count``: 1 on a first delivery; the holder died, or the worker
gave it back with ``requeue_failed`` because the child running it died; a plain
requeue, the give-back of a warm shutdown or a reconnect, a deferred ETA or a
retry are not counted where the broker can tell them apart: see
``taskframe.transport.base`` and each transport). When a received message's count
is over ``worker_delivery_limit`` (that is, it already ran and was lost that many
times), the consumer stops it (``Stop``) instead of running it:

1. the task's FAILURE is stored with ``DeliveryLimitExceeded`` (a ``WorkerLostError``),
   as a run that failed would be: ``on_failure``, ``task_failure``, errbacks, the
   rest of a chain failed, a chord part counted;
2. the message is dead-lettered: kept in ``<queue>.dead`` (RabbitMQ: the queue's
   dead-letter exchange when it has one), its count started over, so that moving it
   back, or consuming that queue (``-Q <queue>.dead``), runs it again;
3. one error line says which task, how many deliveries and where the message went.

The FAILURE is written on the consumer's store thread (``_store_writes``: a slow store
must not stall the loop), and the message is dead-lettered after it, on the loop. A
result store that is down does not keep the message: it is dead-lettered all the same
and the log line says the FAILURE was not stored. The check runs before the
message is even decoded for a run; a message that cannot be decoded is stopped too,
with what its headers say (``id``, ``task``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from taskframe.errors import DeliveryLimitExceeded, TaskframeError, TransportError
from taskframe.execution.executor import fail_outside
from taskframe.protocol import TaskMessage, decode_message
from taskframe.transport.errors import ConnectionLost
from taskframe.worker.request import Request

if TYPE_CHECKING:
    from taskframe.client.app import Taskframe
    from taskframe.transport import Message

__all__ = ["Stop", "over_limit"]

logger = logging.getLogger("taskframe.worker.consumer")


def over_limit(message: Message, limit: int | None) -> bool:
    """Whether ``message`` was delivered more than ``limit`` times unsettled (None: no limit)."""
    return bool(limit) and message.delivery_count > int(limit or 0)


class Stop:
    """One message over the limit, not run: decoded at once, its FAILURE stored by
    ``store_failure`` (the store thread), then ``dead_letter`` (the loop's thread).

    Args:
        app: the worker's app.
        message: the message received over the limit.
        limit: ``worker_delivery_limit``.
        accept / max_size / hostname: as the consumer decodes messages and names itself.
    """

    def __init__(self, app: Taskframe, message: Message, *, limit: int,
                 accept: tuple[str, ...], max_size: int | None, hostname: str) -> None:
        self.app = app
        self.message = message
        self.limit = limit
        self.count = message.delivery_count
        self.hostname = hostname
        self.tm = _decoded(message, accept, max_size)
        tm = self.tm
        self.task_id = tm.id if tm is not None else str(message.headers.get("id") or "?")
        self.name = ((tm.shadow or tm.name) if tm is not None
                     else str(message.headers.get("task") or "?"))
        self.exc = DeliveryLimitExceeded(
            f"delivered {self.count} times without being settled (worker_delivery_limit="
            f"{limit}): each run lost the process running it; not run again")
        #: What ``store_failure`` did, for the log line.
        self.stored = "no result backend"

    def store_failure(self) -> None:
        """Settle the task as failed with ``DeliveryLimitExceeded`` (never raises)."""
        self.stored = _store_failure(self.app, self.message, self.tm, self.task_id, self.exc,
                                     self.hostname)

    def dead_letter(self) -> None:
        """Dead-letter the message and log the one line that says so.

        Raises:
            ConnectionLost: the link dropped before it was settled (it comes back).
        """
        name, task_id, count, limit = self.name, self.task_id, self.count, self.limit
        try:
            where = self.message.dead_letter()
        except ConnectionLost:
            raise
        except TransportError as exc:
            logger.error("Task %s[%s]: delivered %d times unsettled (worker_delivery_limit=%d),"
                         " and it could not be dead-lettered: %s", name, task_id, count, limit,
                         exc)
            return
        logger.error(
            "Task %s[%s] not run: delivered %d times without being settled, over "
            "worker_delivery_limit=%d (each run lost the process running it); %s; message %s",
            name, task_id, count, limit, self.stored,
            f"dead-lettered to {where}" if where else "dropped (the broker keeps no dead letters)")


def _decoded(message: Message, accept: tuple[str, ...], max_size: int | None) -> TaskMessage | None:
    try:
        return decode_message(message, accept, max_size)
    except (TaskframeError, TransportError, ValueError) as exc:
        logger.warning("a message over its delivery limit cannot be decoded (%s); its "
                       "headers name it", exc)
        return None


def _store_failure(app: Taskframe, message: Message, tm: TaskMessage | None, task_id: str,
                   exc: DeliveryLimitExceeded, hostname: str) -> str:
    """Settle the task as failed with ``exc``; say what was stored, for the log line."""
    if app.result_backend_url is None:
        return "no result backend"
    task = app.tasks.get(tm.name) if tm is not None else None
    try:
        if tm is not None and task is not None:
            request = Request(message, tm, task, hostname=hostname, acks_late=True)
            fail_outside(task, request.context, exc, store=True,
                         traceback=f"{type(exc).__name__}: {exc}")
        elif task_id != "?":
            app.backend.mark_as_failure(task_id, exc)
        else:
            return "no task id to store a FAILURE for"
    except Exception as store_exc:
        return f"its FAILURE could not be stored ({store_exc!r})"
    return "FAILURE stored"
