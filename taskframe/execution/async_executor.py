"""Running one ``async def`` task on a running event loop (the ``asyncio`` pool).

The twin of ``trace.execute``, with the same hooks, signals, retries, results
and callbacks. The body is awaited on the loop; the bookkeeping around it
(``task_prerun``, STARTED, the result store, hooks, callbacks, ``task_postrun``)
is synchronous, possibly slow I/O, so it runs in the loop's default executor and
never stalls the other coroutines. ``self.request`` is the run's ``Context``
everywhere, threads included (``asyncio.to_thread`` copies the context).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import TYPE_CHECKING, Any

from taskframe import signals
from taskframe.context import Context, request_context
from taskframe.execution.coroutines import BodyRun
from taskframe.execution.executor import (
    BODY_EXITS,
    Outcome,
    _after_run,
    _before_body,
    _exception_outcome,
    _maybe_autoretry,
    _on_failure,
    _on_success,
)
from taskframe.execution.revoked import revoked_at_start, skip_revoked

if TYPE_CHECKING:
    from taskframe.client.task import Task

__all__ = ["execute_async"]

logger = logging.getLogger("taskframe.worker.trace_async")


async def execute_async(task: Task[Any, Any], ctx: Context, *, store: bool = True,
                        body: BodyRun | None = None) -> Outcome:
    """Run ``task`` with ``ctx`` as its request, awaiting its body here.

    Args:
        task: an ``async def`` task (a synchronous one runs here too, blocking the loop).
        ctx: its request.
        store: whether results go to the result backend.
        body: the pool's handle to interrupt the body (time limits, cancellation).

    Raises:
        asyncio.CancelledError: the body was cancelled (shutdown, terminate) and did not
            finish; nothing was stored.
    """
    args, kwargs = list(ctx.args), dict(ctx.kwargs)
    backend = task.backend if store else None
    body = body or BodyRun()
    # Only a run that may be skipped pays the hop to a thread (an ETA task reads its state).
    if (ctx.eta is not None or ctx.should_abort()) and \
            await asyncio.to_thread(revoked_at_start, ctx, backend):
        return await asyncio.to_thread(skip_revoked, task, ctx, backend)
    with request_context(ctx):
        error: BaseException | None = await asyncio.to_thread(_begin, task, ctx, args, kwargs,
                                                              backend)
        retval: Any = None
        from_body = False
        if error is None:
            from_body = True
            try:
                retval = task.run(*args, **kwargs)
                if inspect.iscoroutine(retval):
                    retval = await body.run(retval)
            except Exception as exc:
                error = exc
            except BODY_EXITS as exc:
                if isinstance(exc, asyncio.CancelledError) and _pool_cancelled(body):
                    raise  # shutdown or terminate: this run did not finish
                error = exc  # the body's own: it fails the task, as on every other pool
        return await asyncio.to_thread(_finish, task, ctx, args, kwargs, backend, retval, error,
                                       from_body)


def _begin(task: Task[Any, Any], ctx: Context, args: list[Any], kwargs: dict[str, Any],
           backend: Any) -> Exception | None:
    """``task_prerun``, STARTED, ``before_start``; the error that ends the run early."""
    signals.task_prerun.send(sender=task, task_id=ctx.id, task=task, args=args, kwargs=kwargs)
    try:
        _before_body(task, ctx, args, kwargs, backend)
    except Exception as exc:
        return exc
    return None


def _finish(task: Task[Any, Any], ctx: Context, args: list[Any], kwargs: dict[str, Any],
            backend: Any, retval: Any, error: BaseException | None, from_body: bool) -> Outcome:
    """Store and announce the outcome: success, retry, failure; then ``after_return``."""
    if error is None:
        outcome = _on_success(task, ctx, retval, backend)
    else:
        outcome = _error_outcome(task, ctx, backend, error, from_body)
    _after_run(task, ctx, args, kwargs, outcome)
    return outcome


def _error_outcome(task: Task[Any, Any], ctx: Context, backend: Any, error: BaseException,
                   from_body: bool) -> Outcome:
    # Raised again here so that the shared handlers read it (and its traceback, which
    # keeps the body's frames) from sys.exc_info(), as on the synchronous path.
    try:
        try:
            raise error
        except Exception as exc:
            if from_body:
                _maybe_autoretry(task, ctx, exc)
            raise
    except Exception as exc:
        return _exception_outcome(task, ctx, exc, backend)
    except BaseException as exc:  # BODY_EXITS
        return _on_failure(task, ctx, exc, backend)


def _pool_cancelled(body: BodyRun) -> bool:
    """Whether the pool cancelled this run (a time limit, terminate, or its own shutdown,
    which cancels the job's task itself) rather than the body cancelling itself."""
    current = asyncio.current_task()
    return body.cancel_reason is not None or (current is not None and current.cancelling() > 0)
