"""The child side of the ``prefork`` pool: what runs in each forked process.

A child runs the app's worker start hooks and says ``("ready", error)``; then it
reads jobs from its pipe, runs them with ``taskframe.worker.trace.execute``
(results are stored and callbacks sent from here, as Celery's children do) and
writes back one small message per job: ``("done", seq, WireOutcome, recycle)``.
(The parent counts a job as accepted when it writes it to this idle child.) A second, one-way
pipe carries abort requests, read by a small thread so that ``should_abort()``
turns true while the task runs. ``None`` on the job pipe (or the parent's end
closing) ends the child.

Signals in a child: SIGINT is ignored (the worker decides about Ctrl-C), SIGTERM
has its default action (``revoke --terminate`` kills the child), SIGUSR1 raises
``SoftTimeLimitExceeded`` inside the running task.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import resource
import signal
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from types import FrameType
from typing import TYPE_CHECKING, Any

from taskframe import signals, states
from taskframe.context import Context
from taskframe.errors import NotRegistered, SoftTimeLimitExceeded
from taskframe.execution.coroutines import deliver_soft_limit
from taskframe.pools.base import TaskJob, call_hook, internal_failure

if TYPE_CHECKING:
    from taskframe.client.app import Taskframe
    from taskframe.execution.outcome import Outcome

__all__ = ["EX_HOOK_FAILED", "ChildOptions", "JobSpec", "WireOutcome", "child_main",
           "job_spec"]

logger = logging.getLogger("taskframe.pools.prefork")

#: A child's exit status when a worker start hook failed in it (EX_SOFTWARE).
EX_HOOK_FAILED = 70

# Types pickled as they are, without the round-trip check.
_PLAIN = (type(None), bool, int, float, str, bytes)


@dataclass(frozen=True)
class JobSpec:
    """One job as sent to a child: the task name and the request without its Event."""

    seq: int
    task_name: str
    fields: dict[str, Any]
    store: bool
    abort_reason: str | None = None


@dataclass(frozen=True)
class WireOutcome:
    """An ``Outcome`` that survives the pipe: ``retval`` is its ``repr`` when unpicklable."""

    state: str
    retval: Any = None
    traceback: str | None = None
    requeue: bool = False


@dataclass
class ChildOptions:
    """What a child needs besides its pipes."""

    index: int = 0
    max_tasks: int | None = None
    max_memory_kib: int | None = None


def job_spec(seq: int, job: TaskJob) -> JobSpec:
    """The picklable form of ``job`` (the request's fields, not its ``threading.Event``)."""
    ctx = job.context
    fields = {k: v for k, v in vars(ctx).items() if k != "_abort"}
    reason = ctx.abort_reason if ctx.should_abort() else None
    return JobSpec(seq, job.task.name, fields, job.store, reason)


def _portable(value: Any) -> Any:
    """``value`` if it pickles both ways, else its ``repr``."""
    if isinstance(value, _PLAIN):
        return value
    try:
        pickle.loads(pickle.dumps(value, pickle.HIGHEST_PROTOCOL))
    except Exception:
        return repr(value)
    return value


def _rss_kib() -> int:
    """This process's resident set size now, in KiB (peak RSS where /proc is missing)."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError, IndexError):
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


class _Runner:
    """The child's state: the job running now and the aborts that arrived for it."""

    def __init__(self, app: Taskframe, conn: Connection, control: Connection,
                 options: ChildOptions) -> None:
        self.app = app
        self.conn = conn
        self.control = control
        self.options = options
        self.lock = threading.Lock()
        self.current: tuple[int, Context] | None = None
        self.aborts: dict[int, str] = {}

    def on_soft_limit(self, signum: int, frame: FrameType | None) -> None:
        """SIGUSR1: raise in the task (ignored between tasks: the parent was late); an
        ``async def`` body gets it at its current ``await`` (``deliver_soft_limit``)."""
        if self.current is not None and not deliver_soft_limit():
            raise SoftTimeLimitExceeded()

    def read_aborts(self) -> None:
        """Thread: turn abort messages into ``request_abort`` on the running request."""
        while True:
            try:
                seq, reason = self.control.recv()
            except (EOFError, OSError):
                return
            with self.lock:
                current = self.current
                if current is not None and current[0] == seq:
                    current[1].request_abort(reason)
                else:
                    self.aborts[seq] = reason  # the job is still on its way

    def loop(self) -> str | None:
        """Run jobs until told to stop; return why this child retires, if it does."""
        done = 0
        while True:
            try:
                spec = self.conn.recv()
            except (EOFError, OSError):
                return None  # the parent is gone
            if spec is None:
                return None
            outcome = self.run(spec)
            done += 1
            recycle = self.recycle_reason(done)
            try:
                self.conn.send(("done", spec.seq, outcome, recycle))
            except OSError:  # BrokenPipeError: the worker died (kill -9) while we ran
                logger.warning("the worker is gone: the outcome of task %s (%s) cannot be "
                               "reported; this child exits", spec.fields.get("id"), outcome.state)
                return None
            if recycle is not None:
                return recycle

    def run(self, spec: JobSpec) -> WireOutcome:
        """Run one job; never raises."""
        from taskframe.execution.executor import execute

        ctx = Context(**spec.fields)
        task = self.app.tasks.get(spec.task_name)
        if task is None:
            return WireOutcome(states.FAILURE, repr(NotRegistered(spec.task_name)))
        with self.lock:
            self.current = (spec.seq, ctx)
            reason = self.aborts.pop(spec.seq, None) or spec.abort_reason
            if reason is not None:
                ctx.request_abort(reason)
        outcome: Outcome
        try:
            try:
                outcome = execute(task, ctx, store=spec.store)
            finally:
                with self.lock:
                    self.current = None
                    self.aborts.clear()
        except Exception as exc:  # SoftTimeLimitExceeded outside the body, a broken store
            job = TaskJob(task=task, context=ctx, store=spec.store, on_accepted=_ignore,
                          on_done=_ignore)
            outcome = internal_failure(job, exc)
        return WireOutcome(outcome.state, _portable(outcome.retval), outcome.traceback,
                           outcome.requeue)

    def recycle_reason(self, done: int) -> str | None:
        """Why this child should be replaced now (max tasks, max memory), or None."""
        opts = self.options
        if opts.max_tasks and done >= opts.max_tasks:
            return f"max tasks per child reached ({done})"
        if opts.max_memory_kib:
            rss = _rss_kib()
            if rss > opts.max_memory_kib:
                return f"max memory per child exceeded ({rss} KiB > {opts.max_memory_kib} KiB)"
        return None


def _start_hooks(app: Taskframe) -> str | None:
    """Run the app's worker start hooks here; the first failure's repr, or None."""
    for hook in app.worker_start_hooks:
        try:
            call_hook(hook)
        except Exception as exc:
            logger.critical("worker start hook %r failed in child %d: %r", hook, os.getpid(),
                            exc, exc_info=exc)
            return repr(exc)
    return None


def _stop_hooks(app: Taskframe) -> None:
    for hook in app.worker_stop_hooks:
        try:
            call_hook(hook)
        except Exception:
            logger.exception("worker stop hook %r failed in child %d", hook, os.getpid())


def _ignore(*args: Any) -> None:
    """A callback that does nothing (a job built in the child only reports failures)."""


def child_main(app: Taskframe, conn: Connection, control: Connection,
               options: ChildOptions) -> None:
    """The body of a forked child process (returns when the child should exit).

    Raises:
        SystemExit: ``EX_HOOK_FAILED`` when a worker start hook failed (after telling
            the parent with ``("ready", error)``).
    """
    multiprocessing.current_process().name = f"ForkPoolWorker-{options.index}"  # %(processName)s
    runner = _Runner(app, conn, control, options)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGUSR1, runner.on_soft_limit)
    app._after_fork()
    signals.worker_process_init.send(sender=None)
    error = _start_hooks(app)
    conn.send(("ready", error))
    if error is not None:
        signals.worker_process_shutdown.send(sender=None, pid=os.getpid(),
                                             exitcode=EX_HOOK_FAILED)
        raise SystemExit(EX_HOOK_FAILED)
    threading.Thread(target=runner.read_aborts, name="taskframe-abort-reader",
                     daemon=True).start()
    exitcode = 0
    try:
        reason = runner.loop()
        if reason is not None:
            logger.info("child %d exits: %s", os.getpid(), reason)
    except BaseException:
        exitcode = 1
        raise
    finally:
        _stop_hooks(app)
        signals.worker_process_shutdown.send(sender=None, pid=os.getpid(), exitcode=exitcode)
        try:
            app.close()
        except Exception:
            logger.exception("closing the app's clients in child %d failed", os.getpid())
