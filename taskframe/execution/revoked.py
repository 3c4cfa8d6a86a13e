"""A run that must not start: revoked while it waited for its slot, or revoked long ago.

``execute`` and ``execute_async`` ask ``revoked_at_start`` first, in the pool slot that
took the job (a pool thread, greenlet, coroutine or prefork child), and skip the body
when it says so:

- the request's abort was asked with reason ``"revoked"`` before the body started: the
  consumer does that when a slot takes a job whose id is in the revoked set (a job the
  pool held ahead of a free slot, revoked meanwhile), and ``revoke --terminate`` does it
  for a job not started yet on pools that cannot interrupt a thread;
- a task with an ETA (a countdown, an ``eta``, a retry) whose stored state is REVOKED: a
  revoke stores that state (``control.revoked.mark_revoked``), which lasts as long as
  results are kept (``result_expires``), while the revoked sets forget an id after
  ``worker_revoked_expires``; an ETA further away than that would otherwise run. One
  read of the result store per ETA task; tasks without an ETA read nothing.

A skipped run stores REVOKED (never over a finished result), sends ``task_revoked``, and
its outcome is REVOKED: the worker acks its message and counts a chord part.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from taskframe import signals, states
from taskframe.errors import TaskRevokedError
from taskframe.execution.outcome import Outcome

if TYPE_CHECKING:
    from taskframe.client.task import Task
    from taskframe.context import Context

__all__ = ["REVOKED", "revoked_at_start", "skip_revoked"]

logger = logging.getLogger("taskframe.worker.trace")

#: The abort reason that, asked before the body starts, means "do not run it".
REVOKED = "revoked"


def revoked_at_start(ctx: Context, backend: Any) -> bool:
    """True when the run must not start (see the module docstring).

    A result store that cannot be read does not stop the run (it is logged): a task is
    not dropped because its state could not be checked.
    """
    if ctx.abort_reason == REVOKED and ctx.should_abort():
        return True
    if backend is None or ctx.eta is None or ctx.is_eager:
        return False
    try:
        return bool(backend.get_task_meta(str(ctx.id))["status"] == states.REVOKED)
    except Exception as exc:
        logger.warning("Task %s[%s]: could not read its stored state before it runs (%r); "
                       "running it", ctx.task, ctx.id, exc)
        return False


def skip_revoked(task: Task[Any, Any], ctx: Context, backend: Any) -> Outcome:
    """Do not run the body: store REVOKED, send ``task_revoked``; the REVOKED outcome."""
    logger.info("Discarding revoked task: %s[%s]", task.name, ctx.id)
    if backend is not None and not ctx.ignore_result:
        try:
            backend.mark_as_revoked(str(ctx.id), REVOKED)
        except Exception as exc:
            logger.warning("could not store REVOKED for %s: %r", ctx.id, exc)
    signals.task_revoked.send(sender=task, request=ctx, terminated=False, signum=None,
                              expired=False)
    return Outcome(states.REVOKED, TaskRevokedError(REVOKED))
