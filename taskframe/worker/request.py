"""``Request``: one received task message, decoded, matched to its task, ready to run."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from taskframe.context import Context
from taskframe.protocol import TaskMessage

if TYPE_CHECKING:
    from taskframe.client.task import Task
    from taskframe.pools.base import TaskJob
    from taskframe.transport import Message

__all__ = ["Request"]


class Request:
    """A task message held by the worker until it is settled."""

    __slots__ = ("ack_in_loop", "acks_late", "context", "job", "message", "start_error",
                 "started", "task", "tm")

    def __init__(self, message: Message, tm: TaskMessage, task: Task[Any, Any], *,
                 hostname: str, acks_late: bool) -> None:
        self.message = message
        self.tm = tm
        self.task = task
        self.acks_late = acks_late
        self.started = False
        self.job: TaskJob | None = None
        #: An early ack the loop writes itself, before submitting (a slot could not).
        self.ack_in_loop = False
        #: Why a slot could not write its early ack (``Consumer._ack_in_slot``).
        self.start_error: Exception | None = None
        ignore = tm.ignore_result
        if ignore is None:
            ignore = task.ignore_result if task.ignore_result is not None \
                else task.app.conf.task_ignore_result
        self.context = Context(
            id=tm.id, task=task.name, args=list(tm.args), kwargs=dict(tm.kwargs),
            retries=tm.retries, hostname=hostname, delivery_info=dict(message.delivery_info),
            eta=tm.eta, expires=tm.expires, root_id=tm.root_id, parent_id=tm.parent_id,
            group=tm.group, group_index=tm.group_index, correlation_id=tm.correlation_id,
            reply_to=tm.reply_to, origin=tm.origin, is_eager=False, called_directly=False,
            ignore_result=bool(ignore), timelimit=(tm.time_limit, tm.soft_time_limit),
            callbacks=tm.callbacks, errbacks=tm.errbacks, chain=tm.chain, chord=tm.chord,
            headers=dict(message.headers), priority=tm.priority, shadow=tm.shadow,
            stamps=dict(tm.stamps),
        )

    @property
    def id(self) -> str:
        """The task id."""
        return self.tm.id

    @property
    def name(self) -> str:
        """The name shown in logs (the shadow name when one was given)."""
        return self.tm.shadow or self.tm.name

    def expired(self, now: datetime | None = None) -> bool:
        """True when the message's ``expires`` has passed."""
        if self.tm.expires is None:
            return False
        return (now or datetime.now(UTC)) >= self.tm.expires

    def eta_delay(self, now: datetime | None = None) -> float:
        """Seconds until the ETA (0 when none or past)."""
        if self.tm.eta is None:
            return 0.0
        return max(0.0, (self.tm.eta - (now or datetime.now(UTC))).total_seconds())

    def __repr__(self) -> str:
        return f"<Request {self.name}[{self.id}]>"
