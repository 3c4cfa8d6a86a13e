"""Outcomes the ``prefork`` parent decides when a child cannot report its own.

A child killed at its hard time limit, lost to a signal or the OOM killer, or
terminated by ``revoke --terminate`` never writes its result: the parent stores
it (as Celery's parent process does) and hands the consumer the ``Outcome``.
Messages and exception texts follow billiard's, so results read the same.
"""

from __future__ import annotations

import logging
import signal
from typing import TYPE_CHECKING, Any

from taskframe import states
from taskframe.errors import TaskRevokedError, TimeLimitExceeded, WorkerLostError

if TYPE_CHECKING:
    from taskframe.client.app import Taskframe
    from taskframe.execution.outcome import Outcome
    from taskframe.pools.base import TaskJob

__all__ = ["human_status", "make_outcome", "signame", "terminated", "timed_out",
           "worker_lost"]

logger = logging.getLogger("taskframe.pools.prefork")


def make_outcome(state: str, retval: Any = None, traceback: str | None = None,
                 requeue: bool = False) -> Outcome:
    """An ``Outcome`` (imported late: the trace pulls in the canvas, not needed at startup)."""
    from taskframe.execution.outcome import Outcome

    return Outcome(state, retval, traceback, requeue)


def timed_out(job: TaskJob, app: Taskframe) -> Outcome:
    """``job`` hit its hard time limit and its child was killed: FAILURE, stored."""
    limit = job.time_limit
    logger.error("Hard time limit (%ss) exceeded for %s[%s]", limit, job.task.name, job.id)
    exc = TimeLimitExceeded(limit)
    return _failed(job, app, exc)


def worker_lost(job: TaskJob, app: Taskframe, *, seq: int, exitcode: int | None,
                stopping: bool) -> Outcome:
    """The child running ``job`` died: requeue (``reject_on_worker_lost``) or fail."""
    exc = WorkerLostError(f"Worker exited prematurely: {human_status(exitcode)} Job: {seq}.")
    if stopping:  # the pool's own SIGTERM/SIGKILL at shutdown: back to the broker if late
        logger.warning("Task %s[%s] stopped by the shutdown: %s", job.task.name, job.id, exc)
        return make_outcome(states.REJECTED, exc, requeue=True)
    if _acks_late(job, app) and _reject_on_worker_lost(job, app):
        logger.error("Task %s[%s] requeued (reject_on_worker_lost): %s", job.task.name, job.id,
                     exc)
        outcome = make_outcome(states.REJECTED, exc, requeue=True)
        outcome.delivery_failed = True  # counted toward worker_delivery_limit
        return outcome
    logger.error("Task handler raised error: %r", exc)
    return _failed(job, app, exc)


def terminated(job: TaskJob, app: Taskframe) -> Outcome:
    """``job`` was terminated on request: REVOKED with ``TaskRevokedError('terminated')``."""
    exc = TaskRevokedError("terminated")
    if job.store and _store_errors(job, app):
        try:
            job.task.backend.mark_as_revoked(job.id, "terminated")
        except Exception as store_exc:
            logger.error("Task %s[%s]: could not store REVOKED: %r", job.task.name, job.id,
                         store_exc)
    return make_outcome(states.REVOKED, exc)


def _failed(job: TaskJob, app: Taskframe, exc: Exception) -> Outcome:
    # The child never reported: settle it here as the body's own failure would be
    # (stored, on_failure, task_failure, errbacks, the chord's count).
    from taskframe.execution.executor import fail_outside

    text = f"{type(exc).__name__}: {exc}"
    try:
        return fail_outside(job.task, job.context, exc, store=job.store, traceback=text)
    except Exception as settle_exc:
        # The result store is down (or a hook failed): the message is settled all the
        # same, and the supervisor thread that called this must live on.
        logger.error("Task %s[%s] failed (%s) and that could not be stored: %r",
                     job.task.name, job.id, text, settle_exc)
        return make_outcome(states.FAILURE, exc, text)


def _store_errors(job: TaskJob, app: Taskframe) -> bool:
    if not job.context.ignore_result:
        return True
    value = job.task.store_errors_even_if_ignored
    return bool(app.conf.task_store_errors_even_if_ignored if value is None else value)


def _acks_late(job: TaskJob, app: Taskframe) -> bool:
    value = getattr(job.request, "acks_late", None)  # the consumer's decision, when known
    if value is None:
        value = job.task.acks_late
    return bool(app.conf.task_acks_late if value is None else value)


def _reject_on_worker_lost(job: TaskJob, app: Taskframe) -> bool:
    value = job.task.reject_on_worker_lost
    return bool(app.conf.task_reject_on_worker_lost if value is None else value)


def signame(signum: int) -> str:
    """``SIGKILL`` for 9 (the number when the signal has no name)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


def human_status(exitcode: int | None) -> str:
    """billiard's wording: ``signal 9 (SIGKILL)`` or ``exitcode 1``."""
    if exitcode is not None and exitcode < 0:
        return f"signal {-exitcode} ({signame(-exitcode)})"
    return f"exitcode {exitcode}"
