"""What the ``gevent`` and ``eventlet`` pools share: one greenlet per job.

The worker process is monkey-patched at startup (``taskframe.bootstrap``, from
``-P gevent|eventlet`` on the command line), so the consumer loop, which runs in
the main greenlet, yields to the jobs whenever it waits on the broker or on its
completion queue. Time limits use the library's ``Timeout``: at the soft limit
``SoftTimeLimitExceeded`` is raised inside the task (which may catch it); at the
hard limit the greenlet is interrupted and the task fails with
``TimeLimitExceeded``. ``terminate`` kills the job's greenlet.

Subclasses supply four small methods: ``_check_patched``, ``_spawn``,
``_start_timeout`` and ``_kill`` (plus ``_join``).
"""

from __future__ import annotations

import abc
import logging
import signal
from typing import TYPE_CHECKING, Any, Protocol

from taskframe.errors import SoftTimeLimitExceeded
from taskframe.pools._limits import (
    HardTimeLimit,
    Terminated,
    terminated_outcome,
    time_limit_outcome,
)
from taskframe.pools.base import Pool, TaskJob, internal_failure

if TYPE_CHECKING:
    from taskframe.client.app import Taskframe
    from taskframe.execution.outcome import Outcome

__all__ = ["GreenletPool"]

logger = logging.getLogger("taskframe.pools.green")


class _Timer(Protocol):
    def cancel(self) -> None: ...


class GreenletPool(Pool):
    """A pool that runs each job in a greenlet of its own."""

    enforces_time_limits = True

    def __init__(self, concurrency: int, *, app: Taskframe | None = None) -> None:
        super().__init__(concurrency, app=app)
        self._greenlets: dict[TaskJob, Any] = {}  # every job not yet done
        self._in_body: set[TaskJob] = set()  # jobs inside ``execute``: safe to interrupt
        self._terminated: set[TaskJob] = set()  # terminated before they started

    # -- what each library supplies --------------------------------------------------

    @abc.abstractmethod
    def _check_patched(self) -> None:
        """Raise ``ImproperlyConfigured`` unless the process is monkey-patched."""

    @abc.abstractmethod
    def _spawn(self, job: TaskJob) -> Any:
        """Start ``self._run(job)`` in a new greenlet; return it."""

    @abc.abstractmethod
    def _start_timeout(self, seconds: float, exc: BaseException) -> _Timer:
        """Raise ``exc`` in the current greenlet after ``seconds`` unless cancelled."""

    @abc.abstractmethod
    def _kill(self, greenlet: Any, exc: BaseException | None) -> None:
        """Raise ``exc`` (None: ``GreenletExit``) in ``greenlet`` without waiting for it."""

    @abc.abstractmethod
    def _join(self, greenlets: list[Any], timeout: float | None) -> None:
        """Wait for ``greenlets`` to end, at most ``timeout`` seconds."""

    # -- the pool interface ------------------------------------------------------------

    def submit(self, job: TaskJob) -> None:
        """Run ``job`` in a new greenlet."""
        self._greenlets[job] = None  # counted as active from now on
        self._greenlets[job] = self._spawn(job)

    @property
    def active(self) -> int:
        """Jobs submitted and not done."""
        return len(self._greenlets)

    def terminate(self, job: TaskJob, signum: int = signal.SIGTERM) -> bool:
        """Kill the job's greenlet: the task is stored as REVOKED (``terminated``)."""
        job.context.request_abort("revoked")
        if job in self._in_body:
            greenlet = self._greenlets.get(job)
            if greenlet is not None:
                self._kill(greenlet, Terminated())
                return True
        elif job in self._greenlets and job.time_start is None:
            self._terminated.add(job)  # not started yet: it ends as soon as it starts
            return True
        return False

    def grow(self, n: int = 1) -> None:
        """Allow ``n`` more greenlets at once."""
        self.concurrency += n

    def shrink(self, n: int = 1) -> None:
        """Allow ``n`` fewer greenlets at once (running ones finish)."""
        self.concurrency = max(1, self.concurrency - n)

    def stop(self, *, wait: bool = True, timeout: float | None = None) -> None:
        """Wait for running jobs (with ``wait``, up to ``timeout``), then kill the rest."""
        if wait:
            self._join([g for g in self._greenlets.values() if g is not None], timeout)
        for greenlet in list(self._greenlets.values()):
            if greenlet is not None:  # ends without reporting: its message goes back
                self._kill(greenlet, None)

    # -- one job -------------------------------------------------------------------------

    def _run(self, job: TaskJob) -> None:
        """The job's greenlet: run it within its limits, report the outcome once."""
        try:
            job.accepted()
            if job in self._terminated:
                self._terminated.discard(job)
                outcome = terminated_outcome(job)
            else:
                outcome = self._run_limited(job)
            job.on_done(job, outcome)
        finally:
            self._greenlets.pop(job, None)

    def _run_limited(self, job: TaskJob) -> Outcome:
        from taskframe.execution.executor import execute

        timers: list[_Timer] = []
        self._in_body.add(job)
        try:
            try:
                if job.time_limit:
                    timers.append(self._start_timeout(job.time_limit, HardTimeLimit()))
                if job.soft_time_limit:
                    timers.append(self._start_timeout(job.soft_time_limit,
                                                      SoftTimeLimitExceeded()))
                return execute(job.task, job.context, store=job.store)
            finally:
                self._in_body.discard(job)
                for timer in timers:
                    timer.cancel()
        except HardTimeLimit:
            return time_limit_outcome(job)
        except Terminated:
            return terminated_outcome(job)
        except Exception as exc:
            return internal_failure(job, exc)
