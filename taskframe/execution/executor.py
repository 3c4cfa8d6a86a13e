"""Running one task: hooks, signals, retries, the stored result, then its callbacks.

``execute`` is the single place where a task body runs, for the worker and for
eager calls alike. It never raises for a task's own exception: the outcome
(state, value, traceback) is returned for the caller to settle the message.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import traceback as tb_module
from typing import TYPE_CHECKING, Any

from taskframe import signals, states
from taskframe.context import Context, request_context
from taskframe.errors import Ignore, Reject, Retry
from taskframe.execution.callbacks import dispatch_callbacks, dispatch_errbacks
from taskframe.execution.coroutines import run_coroutine
from taskframe.execution.outcome import Outcome
from taskframe.execution.revoked import revoked_at_start, skip_revoked
from taskframe.protocol.results import ResultContext

if TYPE_CHECKING:
    from taskframe.client.task import Task

__all__ = ["BODY_EXITS", "Outcome", "execute", "fail_outside"]

logger = logging.getLogger("taskframe.worker.trace")

#: What a task body may raise that is not an ``Exception`` and still only ends its own run:
#: ``sys.exit()``, a ``KeyboardInterrupt`` it raised, the ``CancelledError`` of a helper it
#: awaited. Each fails the task (FAILURE stored, errbacks called) and frees its pool slot.
#: The pools' own interruptions (hard time limits, terminate, a cold shutdown's greenlet
#: kill) are other ``BaseException``\ s and pass through.
BODY_EXITS = (SystemExit, KeyboardInterrupt, asyncio.CancelledError)



def _result_context(task: Task[Any, Any], ctx: Context) -> ResultContext:
    return ResultContext(
        name=task.name, args=list(ctx.args), kwargs=dict(ctx.kwargs), worker=ctx.hostname,
        retries=ctx.retries, queue=ctx.delivery_info.get("routing_key"),
        group_id=ctx.group, parent_id=ctx.parent_id,
        reply_to=ctx.reply_to, correlation_id=ctx.correlation_id,
    )


def _store_enabled(task: Task[Any, Any], ctx: Context, *, failure: bool = False) -> bool:
    if not ctx.ignore_result:
        return True
    if failure:
        return bool(task.store_errors_even_if_ignored
                    if task.store_errors_even_if_ignored is not None
                    else task.app.conf.task_store_errors_even_if_ignored)
    return False


def execute(task: Task[Any, Any], ctx: Context, *, store: bool = True) -> Outcome:
    """Run ``task`` with ``ctx`` as its request and return the outcome.

    An ``async def`` task's coroutine runs to its end in an event loop of its own
    (``run_coroutine``); the ``asyncio`` pool awaits it on its loop instead
    (``taskframe.worker.trace_async``). A run revoked before it starts runs nothing
    (``execution.revoked``).
    """
    args, kwargs = list(ctx.args), dict(ctx.kwargs)
    backend = task.backend if store else None
    if revoked_at_start(ctx, backend):
        return skip_revoked(task, ctx, backend)
    with request_context(ctx):
        # Inside the request, as in Celery: receivers may read ``task.request``.
        signals.task_prerun.send(sender=task, task_id=ctx.id, task=task, args=args,
                                 kwargs=kwargs)
        outcome = _run_body(task, ctx, args, kwargs, backend)
        _after_run(task, ctx, args, kwargs, outcome)
    return outcome


def _after_run(task: Task[Any, Any], ctx: Context, args: list[Any], kwargs: dict[str, Any],
               outcome: Outcome) -> None:
    """``after_return``, then ``task_postrun``: still inside the request, as in Celery
    (its trace pops the request after the postrun receivers ran)."""
    try:
        task.after_return(outcome.state, outcome.retval, str(ctx.id), args, kwargs,
                          outcome.traceback)
    except Exception:
        logger.exception("after_return of %s raised", task.name)
    signals.task_postrun.send(sender=task, task_id=ctx.id, task=task, args=args, kwargs=kwargs,
                              retval=outcome.retval, state=outcome.state)


def _run_body(task: Task[Any, Any], ctx: Context, args: list[Any], kwargs: dict[str, Any],
              backend: Any) -> Outcome:
    try:
        _before_body(task, ctx, args, kwargs, backend)
        try:
            retval = task.run(*args, **kwargs)
            if inspect.iscoroutine(retval):
                # An ``async def`` task: run it to the end in an event loop of its own.
                retval = run_coroutine(retval)
        except Exception as exc:
            _maybe_autoretry(task, ctx, exc)
            raise
    except Exception as exc:
        return _exception_outcome(task, ctx, exc, backend)
    except BODY_EXITS as exc:
        return _on_failure(task, ctx, exc, backend)
    return _on_success(task, ctx, retval, backend)


def _before_body(task: Task[Any, Any], ctx: Context, args: list[Any], kwargs: dict[str, Any],
                 backend: Any) -> None:
    """STARTED state (``track_started``) and ``before_start``."""
    task_id = str(ctx.id)
    if backend is not None and _track_started(task) and not ctx.ignore_result:
        backend.mark_as_started(task_id, context=_result_context(task, ctx),
                                meta={"pid": os.getpid(), "hostname": ctx.hostname})
    task.before_start(task_id, args, kwargs)


def _maybe_autoretry(task: Task[Any, Any], ctx: Context, exc: Exception) -> None:
    """``autoretry_for``: turn a listed exception into ``task.retry`` (which raises)."""
    if task.autoretry_for and isinstance(exc, task.autoretry_for) \
            and not isinstance(exc, Retry | Ignore | Reject):
        retry_options = dict(task.retry_kwargs)
        retry_options.pop("countdown", None)
        task.retry(exc=exc, countdown=task.autoretry_countdown(ctx.retries), **retry_options)


def _exception_outcome(task: Task[Any, Any], ctx: Context, exc: Exception,
                       backend: Any) -> Outcome:
    """The outcome of a body that raised; call it inside the ``except`` block (the
    failure's traceback is read from ``sys.exc_info()``)."""
    if isinstance(exc, Retry):
        return _on_retry(task, ctx, exc, backend)
    if isinstance(exc, Ignore):
        return Outcome(states.IGNORED)
    if isinstance(exc, Reject):
        signals.task_rejected.send(sender=task, request=ctx, exc=exc)
        logger.info("Task %s[%s] rejected: %s", task.name, ctx.id, exc.reason)
        return Outcome(states.REJECTED, exc, requeue=exc.requeue)
    return _on_failure(task, ctx, exc, backend)


def _track_started(task: Task[Any, Any]) -> bool:
    value = task.track_started
    return bool(task.app.conf.task_track_started if value is None else value)


def _on_success(task: Task[Any, Any], ctx: Context, retval: Any, backend: Any) -> Outcome:
    task_id = str(ctx.id)
    if backend is not None and _store_enabled(task, ctx):
        backend.mark_as_done(task_id, retval, context=_result_context(task, ctx))
    _hook(task, "on_success", retval, task_id, ctx.args, ctx.kwargs)
    signals.task_success.send(sender=task, result=retval)
    if not ctx.is_eager:
        dispatch_callbacks(task, ctx, retval)
    return Outcome(states.SUCCESS, retval)


def _on_retry(task: Task[Any, Any], ctx: Context, retry: Retry, backend: Any) -> Outcome:
    task_id = str(ctx.id)
    einfo = tb_module.format_exc()
    cause = retry.exc if retry.exc is not None else retry
    if backend is not None and not ctx.ignore_result:
        backend.mark_as_retry(task_id, cause, traceback=einfo,
                              context=_result_context(task, ctx))
    _hook(task, "on_retry", cause, task_id, ctx.args, ctx.kwargs, einfo)
    signals.task_retry.send(sender=task, request=ctx, reason=retry, einfo=einfo)
    logger.info("Task %s[%s] retry: %s", task.name, task_id, retry)
    return Outcome(states.RETRY, retry, einfo)


def fail_outside(task: Task[Any, Any], ctx: Context, exc: Exception, *, store: bool,
                 traceback: str) -> Outcome:
    """Settle a run that ended outside its body: FAILURE as if the body had raised ``exc``.

    For a process pool's parent when the child cannot report (a hard time limit, a
    child lost to a signal): the result is stored, ``on_failure`` and the
    ``task_failure`` signal run, and errbacks and a chord's count are handled, so a
    chain or chord never waits for a run that will not report.
    """
    return _on_failure(task, ctx, exc, task.backend if store else None, einfo=traceback)


def _on_failure(task: Task[Any, Any], ctx: Context, exc: BaseException, backend: Any, *,
                einfo: str | None = None) -> Outcome:
    task_id = str(ctx.id)
    einfo = tb_module.format_exc() if einfo is None else einfo
    if backend is not None and _store_enabled(task, ctx, failure=True):
        backend.mark_as_failure(task_id, exc, traceback=einfo,
                                context=_result_context(task, ctx))
    if task.throws and isinstance(exc, task.throws):
        logger.info("Task %s[%s] raised expected: %r", task.name, task_id, exc)
    else:
        logger.error("Task %s[%s] raised unexpected: %r\n%s", task.name, task_id, exc, einfo)
    _hook(task, "on_failure", exc, task_id, ctx.args, ctx.kwargs, einfo)
    signals.task_failure.send(sender=task, task_id=task_id, exception=exc, args=ctx.args,
                              kwargs=ctx.kwargs, traceback=einfo, einfo=einfo)
    if not ctx.is_eager:
        dispatch_errbacks(task, ctx, exc, einfo)
    return Outcome(states.FAILURE, exc, einfo)


def _hook(task: Task[Any, Any], name: str, *args: Any) -> None:
    """Call a user hook; its error is logged and does not change the task's outcome."""
    try:
        getattr(task, name)(*args)
    except Exception:
        logger.exception("%s of %s raised", name, task.name)
