"""The pool interface: where task bodies run.

The consumer hands the pool a ``TaskJob``: the task, its request, its time
limits, and two callbacks into the consumer. Pools differ only in where the
task runs: one thread (``solo``), several threads, child processes
(``prefork``), greenlets or coroutines. A job never runs in the consumer's own
thread, so the consumer keeps servicing the broker while it runs.

Every pool keeps this contract:

- ``job.claim()`` in the slot that took the job, right before it starts (where
  ``acks_in_slot``): False means it must not start: the slot drops it (no other
  callback) and takes the next;
- ``job.on_accepted(job)`` once, when a slot takes the job;
- ``job.on_done(job, outcome)`` exactly once, whatever happened (success, task
  error, time limit, a lost child process), from any thread of the worker process;
- ``abort(job, reason)`` makes ``request.should_abort()`` true for that run;
- ``terminate(job, signum)`` stops the run as hard as the pool can (a signal to a
  child process, a killed greenlet, a cancelled coroutine); pools that cannot stop
  a thread from outside fall back to ``abort(job, "revoked")`` and return False.

In-process pools run a job with ``run_here``.
"""

from __future__ import annotations

import abc
import asyncio
import inspect
import logging
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from taskframe import states

if TYPE_CHECKING:
    from taskframe.client.app import Taskframe
    from taskframe.client.task import Task
    from taskframe.context import Context
    from taskframe.execution.outcome import Outcome

__all__ = ["Pool", "TaskJob", "call_hook", "internal_failure", "run_here"]

logger = logging.getLogger("taskframe.pools")


@dataclass(eq=False)
class TaskJob:
    """One task run handed to a pool.

    Attributes:
        task: the registered task.
        context: its request (``self.request`` inside the task).
        store: whether results go to the result backend.
        time_limit: hard limit in seconds (None: no limit).
        soft_time_limit: soft limit in seconds (None: no limit).
        on_accepted: called once when a slot takes the job.
        on_done: called exactly once with the outcome.
        pid: the process running it (prefork), for ``inspect active``.
        time_start: ``time.time()`` when a slot took it.
        request: the consumer's handle for this run (opaque to pools).
        before_start: called by ``claim()``, in the slot, before the job starts (the
            consumer writes an early ack there); False: the job must not start.
    """

    task: Task[Any, Any]
    context: Context
    store: bool
    on_accepted: Callable[[TaskJob], None]
    on_done: Callable[[TaskJob, Outcome], None]
    time_limit: float | None = None
    soft_time_limit: float | None = None
    pid: int | None = None
    time_start: float | None = None
    request: Any = None
    before_start: Callable[[TaskJob], bool] | None = None

    @property
    def id(self) -> str:
        """The task id."""
        return str(self.context.id)

    def claim(self) -> bool:
        """Called by a slot that took the job, before it starts; False: do not start it
        (the consumer has it back). The hook runs once per job."""
        before, self.before_start = self.before_start, None
        return before is None or before(self)

    def accepted(self, pid: int | None = None) -> None:
        """Record that a slot took the job and tell the consumer."""
        self.pid = pid
        self.time_start = time.time()
        self.on_accepted(self)


class Pool(abc.ABC):
    """A bounded set of execution slots.

    Args:
        concurrency: the number of slots (``-c``).
        app: the worker's app (pools read their settings from ``app.conf``).

    Class attributes:
        name: the ``-P`` name.
        enforces_time_limits: True when the pool stops a task at its hard time
            limit (the worker warns when limits are set on a pool that cannot).
        acks_in_slot: True when the pool calls ``job.claim()`` in a thread of the
            worker process right before the job starts, so the consumer can hand it an
            early-ack job ahead of a free slot and write the ack there.
    """

    name: ClassVar[str] = ""
    enforces_time_limits: ClassVar[bool] = False
    acks_in_slot: ClassVar[bool] = False

    def __init__(self, concurrency: int, *, app: Taskframe | None = None) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        self.concurrency = concurrency
        self.app = app

    @abc.abstractmethod
    def start(self) -> None:
        """Create the execution slots."""

    @abc.abstractmethod
    def submit(self, job: TaskJob) -> None:
        """Run ``job`` in a free slot; never in the caller's thread.

        The consumer only submits when ``free_slots`` is positive, so nothing
        queues inside a pool: reserved messages stay with the consumer, which
        gives them back to the broker on shutdown.
        """

    @abc.abstractmethod
    def stop(self, *, wait: bool = True, timeout: float | None = None) -> None:
        """End the pool; with ``wait``, let running jobs finish for up to ``timeout``."""

    @property
    @abc.abstractmethod
    def active(self) -> int:
        """How many jobs are running now."""

    @property
    def free_slots(self) -> int:
        """How many more jobs can start now."""
        return max(0, self.concurrency - self.active)

    @property
    def missing_slots(self) -> int:
        """Slots that cannot take a job now because they are being made (a prefork child
        that replaces one that exited; a fork server that does not answer).

        The consumer hands an early-ack job (acknowledged before it is submitted) only to
        a slot that exists and is free. The default suits pools whose slots never go away.
        """
        return 0

    @property
    def queue_ahead(self) -> int:
        """Jobs the consumer may submit beyond ``concurrency`` (default none).

        A pool that holds them starts each the moment a slot frees, without a trip
        through the consumer's thread, still to whichever slot frees first; it must
        give back the ones not started with ``take_back``.
        """
        return 0

    def take_back(self) -> list[TaskJob]:
        """Remove and return the submitted jobs no slot took yet (shutdown, reconnect).

        They get neither ``on_accepted`` nor ``on_done``.
        """
        return []

    def abort(self, job: TaskJob, reason: str) -> None:
        """Ask one running job to stop: ``request.should_abort()`` turns true."""
        job.context.request_abort(reason)

    def terminate(self, job: TaskJob, signum: int = signal.SIGTERM) -> bool:
        """Stop one running job as hard as this pool can; True if it was forced.

        The default is cooperative: the task sees ``should_abort()`` with
        ``abort_reason == "revoked"``.
        """
        self.abort(job, "revoked")
        return False

    @abc.abstractmethod
    def grow(self, n: int = 1) -> None:
        """Add ``n`` slots (``pool_grow``).

        Raises:
            PoolError: this pool has a fixed size.
        """

    @abc.abstractmethod
    def shrink(self, n: int = 1) -> None:
        """Remove ``n`` slots (``pool_shrink``); running jobs finish first.

        Raises:
            PoolError: this pool has a fixed size.
        """

    def run_hooks(self, hooks: Sequence[Callable[[], Any]]) -> None:
        """Run worker start/stop hooks where this pool's tasks run (default: here, now).

        ``async def`` hooks run to completion in an event loop of their own.
        Pools whose tasks run elsewhere (another loop, child processes) override it.
        """
        for hook in hooks:
            call_hook(hook)

    def stats(self) -> dict[str, Any]:
        """Numbers for ``inspect stats`` (Celery's ``pool`` section)."""
        return {"implementation": f"taskframe.pools:{type(self).__name__}",
                "max-concurrency": self.concurrency, "active": self.active,
                "processes": self.processes()}

    def processes(self) -> list[int]:
        """PIDs doing the work (the worker's own for in-process pools)."""
        import os

        return [os.getpid()]


def call_hook(hook: Callable[[], Any]) -> None:
    """Call one start/stop hook; a coroutine it returns is run to completion."""
    result = hook()
    if inspect.isawaitable(result):
        async def wait() -> Any:
            return await result

        asyncio.run(wait())


def internal_failure(job: TaskJob, exc: BaseException) -> Outcome:
    """The outcome when taskframe itself failed around a task (e.g. the result store)."""
    from taskframe.execution.outcome import Outcome

    logger.error("Task %s[%s] raised an internal error: %r", job.task.name, job.id, exc,
                 exc_info=exc)
    if job.store:
        try:
            job.task.backend.mark_as_failure(job.id, exc)
        except Exception as store_exc:
            logger.error("Task %s[%s]: could not store the failure either: %r",
                         job.task.name, job.id, store_exc)
    return Outcome(states.FAILURE, exc)


def run_here(job: TaskJob) -> None:
    """Run ``job`` in the calling thread (in-process pools) and report its outcome."""
    from taskframe.execution.executor import execute

    if not job.claim():
        return
    job.accepted()
    try:
        outcome = execute(job.task, job.context, store=job.store)
    except BaseException as exc:  # the slot is freed on every path
        outcome = internal_failure(job, exc)
    job.on_done(job, outcome)
