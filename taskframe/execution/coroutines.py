"""``async def`` task bodies: run them from synchronous code, and interrupt them.

``run_coroutine`` runs a task's coroutine to its end for the pools that run
synchronous code (solo, threads, prefork, gevent, eventlet) and for eager
``.apply()``: ``asyncio.run`` (a loop of its own per call) in the calling thread.
Two cases run it in a native thread instead, the caller waiting for it:

- the calling thread already runs an event loop (``.apply()`` from async code);
- the caller is a greenlet (gevent, eventlet): greenlets share their thread's
  "running loop" slot, so two of them cannot each run a loop. The library's own
  thread pool runs it, so only the calling greenlet waits. When the greenlet is
  interrupted (the hard time limit, a kill), the coroutine is cancelled.

The soft time limit reaches the body itself on every pool that enforces it:
``SoftTimeLimitExceeded`` is raised at the coroutine's current ``await``, where the
task may catch it (on gevent/eventlet the waiting greenlet passes it on; on prefork
the child's SIGUSR1 handler calls ``deliver_soft_limit``).

When the worker asks the task to abort (the soft-shutdown deadline, a revoke), the
coroutine is cancelled: it sees ``asyncio.CancelledError``, as on the asyncio pool.

``BodyRun`` is for the ``asyncio`` pool: it runs one body as its own asyncio
task on the pool's loop so the pool can interrupt it. ``soft_limit()`` raises
``SoftTimeLimitExceeded`` at the coroutine's current ``await`` (the task may
catch it and clean up); ``cancel(reason)`` cancels it: the task sees
``asyncio.CancelledError``; at the hard limit the run then fails with
``TimeLimitExceeded``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import inspect
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Generator
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from taskframe.context import Context, current_request
from taskframe.errors import Reject, SoftTimeLimitExceeded, TimeLimitExceeded

if TYPE_CHECKING:
    from taskframe.client.task import Task

__all__ = ["TIME_LIMIT", "BodyRun", "deliver_soft_limit", "is_async_task", "run_coroutine"]

T = TypeVar("T")

#: ``BodyRun.cancel`` reason at the hard time limit.
TIME_LIMIT = "time limit"

#: Seconds between two looks at ``request.should_abort()`` while a coroutine runs.
ABORT_POLL_INTERVAL = 0.1
#: Seconds between two looks at a coroutine's outcome by a greenlet whose wait for it
#: was interrupted by the soft time limit.
GREEN_WAIT_INTERVAL = 0.01


def is_async_task(task: Task[Any, Any]) -> bool:
    """True when the task's body is an ``async def`` function (or ``async def run``)."""
    fn = getattr(task, "_fn", None)
    if fn is None:
        fn = type(task).run
    return inspect.iscoroutinefunction(fn)


class _ThreadRun:
    """One coroutine run by ``asyncio.run``, as a ``BodyRun`` so that a soft time limit
    can reach it; cancellable from outside."""

    def __init__(self, awaitable: Awaitable[Any], ctx: Context | None = None) -> None:
        self.awaitable = awaitable
        self.ctx = ctx  # cancelled once it is asked to abort
        self.body = BodyRun()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Task[Any] | None = None
        self.outcome: tuple[Any, BaseException | None] | None = None

    def __call__(self) -> tuple[Any, BaseException | None]:
        """Run it: ``(value, None)`` or ``(None, exception)``, carried to the waiting side
        (thread pools drop a ``BaseException`` such as ``CancelledError``)."""
        try:
            outcome: tuple[Any, BaseException | None] = asyncio.run(self._main()), None
        except BaseException as exc:
            outcome = None, exc
        self.outcome = outcome
        return outcome

    async def _main(self) -> Any:
        self.loop = asyncio.get_running_loop()
        self.task = asyncio.current_task()
        if self.ctx is None:
            return await self.body.run(self.awaitable)
        watcher = asyncio.ensure_future(_cancel_on_abort(self.ctx, self.body))
        try:
            return await self.body.run(self.awaitable)
        finally:
            watcher.cancel()

    def cancel(self) -> None:
        loop, task = self.loop, self.task
        if loop is not None and task is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(task.cancel)

    def soft_limit(self) -> bool:
        """Raise ``SoftTimeLimitExceeded`` in the body at its current ``await`` (from any
        thread, a signal handler included). False when the body has not started."""
        loop = self.loop
        if loop is None:
            return False
        with contextlib.suppress(RuntimeError):  # the loop ended: the body is done
            loop.call_soon_threadsafe(self.body.soft_limit)
        return True

    def wait_cooperatively(self) -> tuple[Any, BaseException | None]:
        """The outcome, waited for by a greenlet (the patched ``time.sleep`` yields)."""
        while self.outcome is None:
            time.sleep(GREEN_WAIT_INTERVAL)
        return self.outcome


#: Coroutine runs a soft time limit may reach, by the thread that runs them
#: (``deliver_soft_limit``).
_soft_targets: dict[int, _ThreadRun] = {}


def deliver_soft_limit() -> bool:
    """Hand a soft time limit to the ``async def`` body the calling thread runs, if any.

    For pools that signal the soft limit to the thread running the task (prefork's
    SIGUSR1 handler): raising there would break out of the event loop, so the body
    would only see its cancellation. Instead ``SoftTimeLimitExceeded`` is raised in
    the body at its current ``await``, where it may catch it, as on the asyncio pool.

    Returns:
        False when no coroutine runs in this thread (raise as for a sync task).
    """
    run = _soft_targets.get(threading.get_ident())
    return run is not None and run.soft_limit()


def _green_offload() -> Callable[[Callable[[], Any]], Any] | None:
    """How to run a function in a native thread from a greenlet, when monkey-patched."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("threading"):
        import gevent

        return gevent.get_hub().threadpool.apply  # type: ignore[no-any-return]
    patcher = sys.modules.get("eventlet.patcher")
    if patcher is not None and patcher.is_monkey_patched("thread"):
        from eventlet import tpool

        return tpool.execute  # type: ignore[no-any-return]
    return None


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def run_coroutine(awaitable: Awaitable[T]) -> T:
    """Run ``awaitable`` to its end and return its value (see the module docstring).

    When the worker asks the running task to abort (``request.should_abort()``: the
    soft-shutdown deadline, a revoke), the coroutine is cancelled: it sees
    ``asyncio.CancelledError``, and the run ends with ``Reject`` (requeued at shutdown).
    """
    ctx = current_request()
    if ctx is not None and ctx.is_eager:
        ctx = None  # nobody asks an eager call to abort
    try:
        return _run_coroutine(awaitable, ctx)
    except asyncio.CancelledError:
        if ctx is None or not ctx.should_abort():
            raise
        reason = ctx.abort_reason
    raise Reject(f"cancelled ({reason})", requeue=reason == "shutdown")


async def _cancel_on_abort(ctx: Context, body: BodyRun) -> None:
    """Cancel ``body`` once ``ctx`` is asked to abort (it sees ``CancelledError``)."""
    while not ctx.should_abort():
        await asyncio.sleep(ABORT_POLL_INTERVAL)
    body.cancel(str(ctx.abort_reason))


def _run_coroutine(awaitable: Awaitable[T], ctx: Context | None) -> T:
    offload = _green_offload()
    run = _ThreadRun(awaitable, ctx)
    outcome: tuple[Any, BaseException | None]
    if offload is None and not _loop_running():
        me = threading.get_ident()
        _soft_targets[me] = run
        try:
            outcome = run()
        finally:
            del _soft_targets[me]
        value, error = outcome
        if error is not None:
            raise error
        return cast(T, value)
    context = contextvars.copy_context()  # self.request, in the native thread too
    if offload is not None:
        try:
            try:
                outcome = offload(lambda: context.run(run))
            except SoftTimeLimitExceeded:
                # The green pool's soft limit reached this greenlet, which only waits:
                # it goes on to the coroutine, which may catch it; wait on.
                if not run.soft_limit():
                    raise
                outcome = run.wait_cooperatively()
        except BaseException:
            run.cancel()
            raise
    else:
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="taskframe-coro") as ex:
            outcome = ex.submit(context.run, run).result()
    value, error = outcome
    if error is not None:
        raise error
    return cast(T, value)


class BodyRun:
    """One coroutine body run as its own asyncio task, interruptible by its pool.

    Every method runs on the loop's thread.

    Args:
        time_limit: the hard limit, for the ``TimeLimitExceeded`` it fails with.
    """

    def __init__(self, time_limit: float | None = None) -> None:
        self.time_limit = time_limit
        self.task: asyncio.Task[Any] | None = None
        self.cancel_reason: str | None = None
        self._soft_due = False  # soft limit reached; not yet raised in the body

    @property
    def started(self) -> bool:
        """True once the body runs."""
        return self.task is not None

    async def run(self, awaitable: Awaitable[T]) -> T:
        """Await ``awaitable`` as its own task; raise what the pool decided."""
        if self.cancel_reason is not None or self._soft_due:  # asked before it started
            if inspect.iscoroutine(awaitable):
                awaitable.close()
            self._raise_decision(None)
            raise SoftTimeLimitExceeded()
        task: asyncio.Task[T] = asyncio.ensure_future(_interruptible(awaitable, self))
        self.task = task
        try:
            value = await task
        except asyncio.CancelledError as exc:
            self._raise_decision(exc)
            raise
        except _BodyExit as carrier:
            raise carrier.exc.with_traceback(carrier.exc.__traceback__) from None
        if self.cancel_reason == TIME_LIMIT:  # the body swallowed the cancellation
            raise TimeLimitExceeded(self.time_limit)
        return value

    def _raise_decision(self, exc: asyncio.CancelledError | None) -> None:
        if self.cancel_reason == TIME_LIMIT:
            raise TimeLimitExceeded(self.time_limit) from None
        if self.cancel_reason is not None:
            raise asyncio.CancelledError(self.cancel_reason) from exc

    def cancel(self, reason: str) -> None:
        """Cancel the body; it sees ``asyncio.CancelledError``."""
        if self.cancel_reason is None:
            self.cancel_reason = reason
        if self.task is not None and not self.task.done():
            self.task.cancel(reason)

    def soft_limit(self) -> None:
        """Raise ``SoftTimeLimitExceeded`` in the body at its current ``await``."""
        if self.task is None:
            self._soft_due = True
        elif not self.task.done() and self.cancel_reason is None:
            self._soft_due = True
            self.task.cancel("soft time limit")

    def _translate(self, exc: asyncio.CancelledError) -> BaseException:
        """What the body sees for a cancellation: ours at the soft limit, else itself."""
        if self._soft_due and self.cancel_reason is None and self.task is not None:
            self._soft_due = False
            self.task.uncancel()
            return SoftTimeLimitExceeded()
        return exc


class _BodyExit(Exception):
    """Carries a body's ``SystemExit``/``KeyboardInterrupt`` out of its asyncio task.

    Raised by a task, asyncio re-raises those two in the event loop itself, which stops
    it (and with it the asyncio pool); ``BodyRun.run`` raises the original again.
    """

    def __init__(self, exc: BaseException) -> None:
        super().__init__(exc)
        self.exc = exc


async def _interruptible(awaitable: Awaitable[T], run: BodyRun) -> T:
    try:
        return await _Interruptible(awaitable, run)
    except (SystemExit, KeyboardInterrupt) as exc:
        raise _BodyExit(exc) from None


class _Interruptible(Generic[T]):
    """Delegates to a coroutine and picks the exception a cancellation delivers to it."""

    def __init__(self, awaitable: Awaitable[T], run: BodyRun) -> None:
        self.awaitable = awaitable
        self.run = run

    def __await__(self) -> Generator[Any, Any, T]:
        inner = self.awaitable.__await__()
        send: Any = None
        throw: BaseException | None = None
        while True:
            try:
                yielded = inner.send(send) if throw is None else inner.throw(throw)
            except StopIteration as stop:
                return cast(T, stop.value)
            send, throw = None, None
            try:
                send = yield yielded
            except GeneratorExit:
                close = getattr(inner, "close", None)
                if close is not None:
                    close()
                raise
            except asyncio.CancelledError as exc:
                throw = self.run._translate(exc)
            except BaseException as exc:
                throw = exc
