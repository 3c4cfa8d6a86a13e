"""The ``prefork`` pool: ``-c N`` forked child processes, one job each at a time.

For CPU-bound tasks, and for tasks that must be stopped from outside. Children
are forked after the app and its tasks are imported; each one resets the app's
inherited broker and backend clients and sends ``worker_process_init`` (and
``worker_process_shutdown`` when it ends). Results are stored and callbacks sent
from the child, as in Celery.

What it enforces:

- hard time limit (``time_limit``): the parent SIGKILLs the child, stores
  ``TimeLimitExceeded`` and forks a replacement;
- soft time limit (``soft_time_limit``): SIGUSR1 raises ``SoftTimeLimitExceeded``
  inside the task, which may catch it;
- ``worker_max_tasks_per_child`` and ``worker_max_memory_per_child`` (KiB of
  resident memory after a task): the child exits after that task and is replaced;
- a child that dies (a signal, the OOM killer) fails its task with
  ``WorkerLostError``, or requeues it with ``acks_late`` + ``reject_on_worker_lost``;
- ``terminate(job, signum)`` signals the child running the job (REVOKED, as
  Celery's ``revoke --terminate``); ``abort(job, reason)`` reaches the task's
  ``request.should_abort()`` through a per-child control pipe.

Why not ``billiard.Pool`` (nor ``multiprocessing.Pool``): the pool interface
addresses one job at a time (abort it, terminate it, time it), so the parent
must know which child runs which job and talk to that child alone. billiard's
Pool shares one inbound queue among all children and hides that mapping behind
its own supervisor, result handler and timeout threads, and it forks
replacements from a thread of the running worker, which deadlocks children when
another thread was inside SQLite (the embedded broker) at that instant. Here
children come from fork servers forked while their parent ran one thread (the
first from the worker at pool start, any replacement from the one before it:
``_prefork_zygote``);
each has its own pipe pair (``multiprocessing.connection.Connection``), and one
parent thread, the supervisor (``_prefork_supervisor``: child lifecycle, time
limits), waits on all of them, so the consumer thread never blocks on a child.
This module holds the pool interface: starting and stopping, job dispatch (an
idle child, or the backlog), abort, terminate and the pool's size.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from taskframe.errors import ImproperlyConfigured
from taskframe.pools._prefork_child import ChildOptions, job_spec
from taskframe.pools._prefork_outcomes import signame, terminated
from taskframe.pools._prefork_supervisor import Child, Supervisor, send_signal
from taskframe.pools._prefork_zygote import Zygote
from taskframe.pools.base import Pool, TaskJob

if TYPE_CHECKING:
    from taskframe.client.app import Taskframe

__all__ = ["PreforkPool"]

logger = logging.getLogger("taskframe.pools.prefork")

# Seconds children get after SIGTERM before SIGKILL when the pool stops.
TERM_GRACE = 1.0


class PreforkPool(Supervisor, Pool):
    """Child processes, each running one job at a time."""

    name = "prefork"
    enforces_time_limits = True
    # Early acks: the consumer loop writes them. The thread that sends a job to a child
    # could, before it sends it: measured on a no-op drain (-c 2), that was no faster on
    # RabbitMQ and 10-18% slower on Redis (the parent's two threads share one GIL).
    # Children that receive and ack their own messages remove the hand-off (the prefork
    # issue).
    acks_in_slot = False

    def __init__(self, concurrency: int, *, app: Taskframe | None = None) -> None:
        super().__init__(concurrency, app=app)
        if app is None:
            raise ImproperlyConfigured("the prefork pool needs the app (its tasks run in "
                                       "the children)")
        self._app = app
        conf = app.conf
        self.max_tasks_per_child = int(conf.worker_max_tasks_per_child or 0) or None
        self.max_memory_per_child = int(conf.worker_max_memory_per_child or 0) or None
        self._zygote: Zygote | None = None
        self._pending = 0  # forks asked of the server, not arrived yet
        self._hook_error: str | None = None  # a worker start hook failed in a child
        self._children: list[Child] = []
        self._backlog: collections.deque[tuple[int, TaskJob]] = collections.deque()
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._seq = itertools.count(1)
        self._index = itertools.count(1)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._stopping = False
        self._closed = False
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the fork server, wait for the first children, start the supervisor."""
        self._zygote = Zygote.start(self._app, ChildOptions(0, self.max_tasks_per_child,
                                                            self.max_memory_per_child))
        with self._lock:
            self._maintain()
        while self._pending and self._zygote is not None:
            self._on_server_events(self._zygote.read_blocking())
        for child in list(self._children):  # their start hooks ran (or failed)
            self._drain(child, block=True)
        self._thread = threading.Thread(target=self._supervise, name="taskframe-prefork",
                                        daemon=True)
        self._thread.start()

    def stop(self, *, wait: bool = True, timeout: float | None = None) -> None:
        """End every child: let running jobs finish (up to ``timeout`` with ``wait``), then
        SIGTERM, then SIGKILL."""
        with self._lock:
            if self._closed:
                return
            self._stopping = True
            for child in self._children:
                self._retire(child)
        if not wait:
            deadline = time.monotonic()
        elif timeout is None:
            deadline = float("inf")
        else:
            deadline = time.monotonic() + timeout
        if not self._wait_empty(deadline):
            self._signal_all(signal.SIGTERM)
            if not self._wait_empty(time.monotonic() + TERM_GRACE):
                self._signal_all(signal.SIGKILL)
                self._wait_empty(time.monotonic() + 5.0)
        with self._lock:
            self._closed = True
        self._wake()
        if self._thread is not None:
            self._thread.join(5.0)
        if self._zygote is not None:
            self._zygote.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _wait_empty(self, deadline: float) -> bool:
        with self._changed:
            while self._children or self._pending:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None or not self._thread.is_alive():
                    return False
                self._changed.wait(min(left, 0.5))
        return True

    def _signal_all(self, signum: int) -> None:
        with self._lock:
            pids = [c.pid for c in self._children]
        for pid in pids:
            send_signal(pid, signum)

    # -- jobs ---------------------------------------------------------------------------

    @property
    def queue_ahead(self) -> int:
        """One job per child may wait here, in one backlog, not in a child's pipe.

        Measured on a no-op drain (-c 2): children sat idle while each "done" went
        from the supervisor thread to the consumer's and the next job came back;
        with a job waiting here the supervisor sends it at once (+25-30% tasks/s on
        Redis and RabbitMQ). Any child that frees takes the next one, as ``-O fair``
        wants; ``take_back`` returns those not started at shutdown.
        """
        return self.concurrency

    @property
    def missing_slots(self) -> int:
        """Slots without a live child: one that exited (``max_tasks_per_child``, a crash)
        and is being replaced, or cannot be while the fork server does not answer."""
        with self._lock:
            live = sum(1 for c in self._children if not c.retiring)
        return max(0, self.concurrency - live)

    def take_back(self) -> list[TaskJob]:
        """Remove and return the jobs waiting for a child (never started)."""
        with self._lock:
            jobs = [job for _, job in self._backlog]
            self._backlog.clear()
        return jobs

    def submit(self, job: TaskJob) -> None:
        """Send ``job`` to an idle child (or hold it until one is free)."""
        with self._lock:
            seq = next(self._seq)
            child = self._idle_child()
            if child is None:
                self._backlog.append((seq, job))
                return
            self._assign(child, seq, job)
        self._send_job(child, seq, job)

    def _idle_child(self) -> Child | None:
        for child in self._children:
            if child.job is None and not child.retiring:
                return child
        return None

    def _assign(self, child: Child, seq: int, job: TaskJob) -> None:
        child.seq, child.job = seq, job
        child.started, child.soft_sent, child.terminated = time.monotonic(), False, None

    def _send_job(self, child: Child, seq: int, job: TaskJob) -> None:
        # The job counts as accepted when it is written to an idle child (which
        # reads nothing else), not when the child says so: cProfile of a no-op drain
        # showed the parent's two threads trading the GIL around every pipe read and
        # write (a 4-syscall "accepted" round per job, ~150 us of each job's write
        # spent waiting for the GIL). A child that dies before reading the job fails
        # it with WorkerLostError, as one that dies running it.
        if job.time_start is None:  # once, even if sent again after a failed write
            job.accepted(child.pid)
        try:
            child.send(job_spec(seq, job))
        except OSError as exc:  # the child died meanwhile: give the job to another one
            logger.warning("could not send %s[%s] to %r: %s", job.task.name, job.id, child, exc)
            with self._lock:
                if child.job is not job:
                    return  # the supervisor already reported it lost
                child.job = None
                child.retiring = True
                self._backlog.appendleft((seq, job))
            self._dispatch_backlog()

    def _dispatch_backlog(self) -> None:
        while True:
            with self._lock:
                if not self._backlog or self._stopping:
                    return
                child = self._idle_child()
                if child is None:
                    return
                seq, job = self._backlog.popleft()
                self._assign(child, seq, job)
            self._send_job(child, seq, job)

    def _running(self, job: TaskJob) -> Child | None:
        for child in self._children:
            if child.job is job:
                return child
        return None

    def abort(self, job: TaskJob, reason: str) -> None:
        """Make ``request.should_abort()`` true in the child running ``job``."""
        job.context.request_abort(reason)  # also seen by a job still in the backlog
        with self._lock:
            child = self._running(job)
            seq = child.seq if child is not None else 0
        if child is not None:
            try:
                child.control.send((seq, reason))
            except OSError as exc:
                logger.warning("could not ask %r to abort: %s", child, exc)

    def terminate(self, job: TaskJob, signum: int = signal.SIGTERM) -> bool:
        """Send ``signum`` to the child running ``job``; it is replaced. True if sent."""
        with self._lock:
            child = self._running(job)
            if child is None:
                queued = [item for item in self._backlog if item[1] is job]
                for item in queued:
                    self._backlog.remove(item)
            else:
                child.terminated = signum
                child.retiring = True
                self._maintain()
        if child is None:
            if queued:  # never started: it ends as terminated all the same
                job.accepted()
                job.on_done(job, terminated(job, self._app))
            return False
        logger.info("terminating %s[%s] in %r with %s", job.task.name, job.id, child,
                    signame(signum))
        send_signal(child.pid, signum)
        return True

    # -- pool size ----------------------------------------------------------------------

    def grow(self, n: int = 1) -> None:
        """Fork ``n`` more children."""
        with self._lock:
            self.concurrency += n
            self._maintain()
        self._dispatch_backlog()

    def shrink(self, n: int = 1) -> None:
        """End ``n`` children (idle ones first; busy ones after their job), never below one."""
        with self._lock:
            n = min(n, self.concurrency - 1)
            self.concurrency -= n
            live = [c for c in self._children if not c.retiring]
            live.sort(key=lambda c: c.job is not None)
            for child in live[:n]:
                self._retire(child)

    def run_hooks(self, hooks: Sequence[Callable[[], Any]]) -> None:
        """Nothing runs here: each child runs the app's worker start hooks when it starts
        and its stop hooks when it ends, since that is where tasks use the resources.

        Raises:
            RuntimeError: for the start hooks, when they failed in a first child (the
                worker then stops).
        """
        if hooks is self._app.worker_start_hooks and self._hook_error:
            raise RuntimeError(f"a worker start hook failed in a prefork child: "
                               f"{self._hook_error}")

    # -- stats --------------------------------------------------------------------------

    @property
    def active(self) -> int:
        """Jobs running (or waiting for a child) now."""
        with self._lock:
            return sum(1 for c in self._children if c.job is not None) + len(self._backlog)

    def processes(self) -> list[int]:
        """The live children's pids."""
        with self._lock:
            return [c.pid for c in self._children if not c.retiring]

    def stats(self) -> dict[str, Any]:
        """``inspect stats`` pool section, with Celery's prefork keys."""
        info = super().stats()
        info.update({"max-tasks-per-child": self.max_tasks_per_child or "N/A",
                     "max-memory-per-child": self.max_memory_per_child or "N/A"})
        return info
