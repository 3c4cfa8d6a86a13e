"""Outcomes of runs a pool stopped: the hard time limit, terminate, shutdown.

Shared by the greenlet and asyncio pools. The markers are ``BaseException``
subclasses so that nothing in ``trace`` (which catches ``Exception``) stops
them on their way out of the task to the pool.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from taskframe import states
from taskframe.errors import Reject, TaskRevokedError, TimeLimitExceeded

if TYPE_CHECKING:
    from taskframe.execution.outcome import Outcome
    from taskframe.pools.base import TaskJob

__all__ = ["HardTimeLimit", "Terminated", "shutdown_outcome", "terminated_outcome",
           "time_limit_outcome"]

logger = logging.getLogger("taskframe.pools")


class HardTimeLimit(BaseException):
    """Raised into a greenlet at its job's hard time limit."""


class Terminated(BaseException):
    """Raised into a greenlet by ``Pool.terminate``."""


def time_limit_outcome(job: TaskJob) -> Outcome:
    """The job hit its hard time limit: FAILURE with ``TimeLimitExceeded``, stored."""
    from taskframe.execution.outcome import Outcome

    exc = TimeLimitExceeded(job.time_limit)
    logger.error("Task %s[%s] hard time limit (%ss) exceeded: stopped", job.task.name, job.id,
                 job.time_limit)
    if job.store and not job.context.ignore_result:
        _store(job, lambda: job.task.backend.mark_as_failure(job.id, exc))
    return Outcome(states.FAILURE, exc)


def terminated_outcome(job: TaskJob) -> Outcome:
    """The job was terminated (``revoke(terminate=True)``): REVOKED, stored."""
    from taskframe.execution.outcome import Outcome

    logger.info("Task %s[%s] terminated", job.task.name, job.id)
    if job.store:
        _store(job, lambda: job.task.backend.mark_as_revoked(job.id, "terminated"))
    return Outcome(states.REVOKED, TaskRevokedError("terminated"))


def shutdown_outcome(job: TaskJob) -> Outcome:
    """The job was cancelled at shutdown before it finished: give its message back."""
    from taskframe.execution.outcome import Outcome

    logger.warning("Task %s[%s] cancelled at shutdown: not finished", job.task.name, job.id)
    return Outcome(states.REJECTED, Reject("cancelled at shutdown", requeue=True), requeue=True)


def _store(job: TaskJob, write: Callable[[], object]) -> None:
    try:
        write()
    except Exception as exc:
        logger.error("Task %s[%s]: could not store its outcome: %r", job.task.name, job.id, exc)
