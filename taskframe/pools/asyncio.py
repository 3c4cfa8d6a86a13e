"""The ``asyncio`` pool: ``-P asyncio -c N``, up to N tasks at once on one event loop.

For ``async def`` tasks. The loop runs in a dedicated thread (uvloop when it is
installed, unless ``worker_asyncio_uvloop`` is False), so the consumer loop keeps
servicing the broker in the main thread. An ``async def`` task is awaited on the
loop; a synchronous task sent here runs in the loop's default executor (a thread
pool of up to ``min(N, 32)`` threads).

Limits and stopping, for ``async def`` tasks:

- soft time limit: ``SoftTimeLimitExceeded`` is raised inside the coroutine at its
  current ``await`` (it may catch it and clean up);
- hard time limit: the coroutine is cancelled and the task fails with
  ``TimeLimitExceeded``;
- ``abort(job, reason)`` (the soft-shutdown deadline): ``request.should_abort()``
  turns true and the coroutine is cancelled; it sees ``asyncio.CancelledError``
  and its message goes back to the broker (late ack) unless it still finishes;
- ``terminate``: the coroutine is cancelled; the task is stored as REVOKED.

A synchronous task here only gets the cooperative ``should_abort()``: threads
cannot be interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from taskframe.execution.coroutines import TIME_LIMIT, BodyRun, is_async_task
from taskframe.pools._daemon_threads import DaemonThreadPoolExecutor
from taskframe.pools._limits import shutdown_outcome, terminated_outcome
from taskframe.pools.base import Pool, TaskJob, internal_failure

if TYPE_CHECKING:
    from taskframe.client.app import Taskframe
    from taskframe.execution.outcome import Outcome

__all__ = ["AsyncioPool"]

logger = logging.getLogger("taskframe.pools.asyncio")

TERMINATED = "terminated"
MAX_EXECUTOR_THREADS = 32


class AsyncioPool(Pool):
    """One event loop in a thread of its own; each job is an asyncio task."""

    name = "asyncio"
    enforces_time_limits = True

    def __init__(self, concurrency: int, *, app: Taskframe | None = None) -> None:
        super().__init__(concurrency, app=app)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._bodies: dict[TaskJob, BodyRun] = {}  # loop thread only
        self._tasks: set[asyncio.Task[None]] = set()
        self._active = 0
        self._lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the loop's thread and wait until the loop runs."""
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run_loop, args=(ready,),
                                        name="taskframe-asyncio", daemon=True)
        self._thread.start()
        ready.wait()

    def _new_loop(self) -> asyncio.AbstractEventLoop:
        if self.app is None or self.app.conf.worker_asyncio_uvloop is not False:
            try:
                import uvloop
            except ImportError:
                pass
            else:
                return uvloop.new_event_loop()
        return asyncio.new_event_loop()

    def _run_loop(self, ready: threading.Event) -> None:
        loop = self._new_loop()
        asyncio.set_event_loop(loop)
        executor = DaemonThreadPoolExecutor(min(self.concurrency, MAX_EXECUTOR_THREADS),
                                            thread_name_prefix="taskframe-aio-sync")
        loop.set_default_executor(executor)
        self._loop = loop
        logger.debug("asyncio pool: %s", type(loop).__module__)
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.wait(pending, timeout=1.0))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            executor.shutdown(wait=False, cancel_futures=True)
            loop.close()

    def run_hooks(self, hooks: Sequence[Callable[[], Any]]) -> None:
        """Run worker start/stop hooks on this pool's loop (so resources they open, such
        as an async connection pool, belong to the loop the tasks run on)."""
        loop = self._loop
        if loop is None:
            super().run_hooks(hooks)
            return
        for hook in hooks:
            asyncio.run_coroutine_threadsafe(_call_on_loop(hook), loop).result()

    def stop(self, *, wait: bool = True, timeout: float | None = None) -> None:
        """Let running jobs finish (with ``wait``, up to ``timeout``); cancel the rest."""
        if wait:
            deadline = None if timeout is None else time.monotonic() + timeout
            while self.active and (deadline is None or time.monotonic() < deadline):
                time.sleep(0.02)
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            loop.call_soon_threadsafe(loop.stop)
        except RuntimeError:  # already closed
            return
        thread.join(timeout=3.0)

    def grow(self, n: int = 1) -> None:
        """Allow ``n`` more coroutines at once."""
        self.concurrency += n

    def shrink(self, n: int = 1) -> None:
        """Allow ``n`` fewer coroutines at once (running ones finish)."""
        self.concurrency = max(1, self.concurrency - n)

    # -- jobs --------------------------------------------------------------------------

    @property
    def active(self) -> int:
        """Jobs submitted and not done."""
        return self._active

    def submit(self, job: TaskJob) -> None:
        """Start ``job`` as an asyncio task on the loop (any thread)."""
        assert self._loop is not None, "start() the pool first"
        with self._lock:
            self._active += 1
        self._loop.call_soon_threadsafe(self._spawn, job)

    def _spawn(self, job: TaskJob) -> None:
        loop = asyncio.get_running_loop()
        # A fresh context per job: each task's ``self.request`` is its own.
        task = loop.create_task(self._run_job(job), context=contextvars.Context())
        self._tasks.add(task)  # the loop keeps only weak references to its tasks
        task.add_done_callback(self._tasks.discard)

    async def _run_job(self, job: TaskJob) -> None:
        loop = asyncio.get_running_loop()
        body = self._bodies[job] = BodyRun(job.time_limit)
        timers: list[asyncio.TimerHandle] = []
        try:
            job.accepted()
            if job.time_limit:
                timers.append(loop.call_later(job.time_limit, body.cancel, TIME_LIMIT))
            if job.soft_time_limit:
                timers.append(loop.call_later(job.soft_time_limit, body.soft_limit))
            try:
                outcome = await self._outcome(job, body)
            except asyncio.CancelledError:
                # Not finished: at shutdown (or when the loop stops) its message goes back;
                # terminated or revoked, it is stored as REVOKED.
                outcome = (shutdown_outcome(job) if body.cancel_reason in (None, "shutdown")
                           else terminated_outcome(job))
            except Exception as exc:
                outcome = internal_failure(job, exc)
            job.on_done(job, outcome)
        finally:
            for timer in timers:
                timer.cancel()
            del self._bodies[job]
            with self._lock:
                self._active -= 1

    async def _outcome(self, job: TaskJob, body: BodyRun) -> Outcome:
        if is_async_task(job.task):
            from taskframe.execution.async_executor import execute_async

            return await execute_async(job.task, job.context, store=job.store, body=body)
        from taskframe.execution.executor import execute

        call = functools.partial(execute, job.task, job.context, store=job.store)
        return await asyncio.get_running_loop().run_in_executor(None, call)

    # -- stopping one job --------------------------------------------------------------

    def abort(self, job: TaskJob, reason: str) -> None:
        """``should_abort()`` turns true; an ``async def`` task is cancelled too."""
        job.context.request_abort(reason)
        self._cancel(job, reason)

    def terminate(self, job: TaskJob, signum: int = signal.SIGTERM) -> bool:
        """Cancel an ``async def`` task (stored REVOKED); a sync one is asked to abort."""
        job.context.request_abort("revoked")
        if not is_async_task(job.task):
            return False
        self._cancel(job, TERMINATED)
        return True

    def _cancel(self, job: TaskJob, reason: str) -> None:
        loop = self._loop
        if loop is None:
            return

        def cancel() -> None:
            body = self._bodies.get(job)
            if body is not None:
                body.cancel(reason)

        with contextlib.suppress(RuntimeError):  # the loop already ended
            loop.call_soon_threadsafe(cancel)


async def _call_on_loop(hook: Callable[[], Any]) -> None:
    result = hook()
    if inspect.isawaitable(result):
        await result
