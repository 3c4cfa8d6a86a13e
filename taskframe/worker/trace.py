"""Running one task: hooks, signals, retries, results, callbacks.

``execute`` is the single place where a task body runs, for the worker and for
eager calls alike. It never raises for a task's own exception: the outcome
(state, value, traceback) is returned for the caller to settle the message.
"""

from __future__ import annotations

import inspect
import logging
import os
import traceback as tb_module
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from taskframe import signals
from taskframe.canvas import Signature
from taskframe.context import Context, request_context
from taskframe.errors import Ignore, Reject, Retry
from taskframe.protocol import states
from taskframe.protocol.results import ResultContext
from taskframe.worker.coroutines import run_coroutine

if TYPE_CHECKING:
    from taskframe.result import EagerResult
    from taskframe.task import Task

__all__ = ["Outcome", "execute", "fail_outside", "publish_retry", "run_eager"]

logger = logging.getLogger("taskframe.worker.trace")


@dataclass
class Outcome:
    """How one run ended. ``state`` is SUCCESS, FAILURE, RETRY, IGNORED or REJECTED."""

    state: str
    retval: Any = None
    traceback: str | None = None
    requeue: bool = False


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
    (``taskframe.worker.trace_async``).
    """
    args, kwargs = list(ctx.args), dict(ctx.kwargs)
    backend = task.backend if store else None
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
        _dispatch_callbacks(task, ctx, retval)
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


def _on_failure(task: Task[Any, Any], ctx: Context, exc: Exception, backend: Any, *,
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
        _dispatch_errbacks(task, ctx, exc, einfo)
    return Outcome(states.FAILURE, exc, einfo)


def _hook(task: Task[Any, Any], name: str, *args: Any) -> None:
    """Call a user hook; its error is logged and does not change the task's outcome."""
    try:
        getattr(task, name)(*args)
    except Exception:
        logger.exception("%s of %s raised", name, task.name)


def _dispatch_callbacks(task: Task[Any, Any], ctx: Context, retval: Any) -> None:
    """Send the links, then the next chain step, then count a chord part.

    Several links are sent as Celery 5.7 sends them: each group link on its own,
    the other links together as one group (so they share a ``group_id``). With
    ``task_inherit_parent_priority`` they get this task's priority.
    """
    from taskframe.canvas import group
    from taskframe.chord import on_chord_part_return

    app = task.app
    family: dict[str, Any] = {"parent_id": ctx.id, "root_id": ctx.root_id or ctx.id}
    if app.conf.task_inherit_parent_priority and ctx.priority is not None:
        family["priority"] = ctx.priority
    links = [Signature.from_dict(sig, app=app) for sig in ctx.callbacks or ()]
    if len(links) == 1:
        links[0].apply_async((retval,), **family)
    elif links:
        for link in links:
            if isinstance(link, group):
                link.apply_async((retval,), **family)
        others = [link for link in links if not isinstance(link, group)]
        if others:
            group(*others, app=app).apply_async((retval,), **family)
    if ctx.chain:
        remaining = list(ctx.chain)
        following = Signature.from_dict(remaining.pop(), app=app)
        following.apply_async((retval,), chain=remaining or None, **family)
    if ctx.group and ctx.chord:
        on_chord_part_return(task, ctx, states.SUCCESS, retval)


def _dispatch_errbacks(task: Task[Any, Any], ctx: Context, exc: Exception, einfo: str) -> None:
    """Call the errbacks, fail the chain steps that will never run, count a chord part."""
    from taskframe.chord import call_errbacks, fail_chain, on_chord_part_return

    call_errbacks(task.app, ctx.errbacks, ctx, exc, einfo)
    if ctx.chain:
        fail_chain(task.app, ctx.chain, exc, einfo)
    if ctx.group and ctx.chord:
        on_chord_part_return(task, ctx, states.FAILURE, exc)


def _takes_request(task: Task[Any, Any]) -> bool:
    """Celery calls an errback in-process with (request, exc, traceback) when its
    function takes more than one positional argument."""
    import inspect

    fn = getattr(task, "__wrapped__", None)
    if fn is None:
        return False
    params = [p for p in inspect.signature(fn).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    bound = 1 if getattr(task, "_bind", False) else 0
    return len(params) - bound > 1


def publish_retry(task: Task[Any, Any], request: Context, args: Sequence[Any] | None,
                  kwargs: dict[str, Any] | None, *, eta: datetime | None,
                  countdown: float | None, **options: Any) -> None:
    """Send the next run of a retried task: same id, ``retries + 1``, same embed."""
    info = request.delivery_info
    queue = options.pop("queue", None) or info.get("queue")
    if not queue and not info.get("exchange"):
        queue = info.get("routing_key")  # the default exchange routes by queue name
    if not queue and info.get("exchange"):
        options.setdefault("exchange", info["exchange"])
        options.setdefault("routing_key", info.get("routing_key"))
    task.app.send_task(
        task.name,
        list(request.args if args is None else args),
        dict(request.kwargs if kwargs is None else kwargs),
        task_id=request.id, retries=request.retries + 1, countdown=countdown, eta=eta,
        expires=request.expires, link=request.callbacks, link_error=request.errbacks,
        chain=request.chain, chord=request.chord, group_id=request.group,
        group_index=request.group_index, root_id=request.root_id, parent_id=request.id,
        priority=request.priority, time_limit=request.timelimit[0],
        soft_time_limit=request.timelimit[1], shadow=request.shadow,
        ignore_result=request.ignore_result, queue=queue, task=task,
        reply_to=options.pop("reply_to", None) or request.reply_to, **options,
    )


def run_eager(task: Task[Any, Any], args: list[Any], kwargs: dict[str, Any],
              options: dict[str, Any]) -> EagerResult[Any]:
    """Run ``task`` here and now (``apply()``); retries run at once, in a loop."""
    import uuid

    from taskframe.result import EagerResult

    conf = task.app.conf
    task_id = options.get("task_id") or str(uuid.uuid4())
    retries = int(options.get("retries", 0))
    ignore = task.ignore_result if task.ignore_result is not None else conf.task_ignore_result
    while True:
        ctx = Context(id=task_id, task=task.name, args=args, kwargs=kwargs, retries=retries,
                      is_eager=True, called_directly=False, root_id=task_id,
                      ignore_result=bool(ignore), hostname=task.app.origin)
        outcome = execute(task, ctx, store=bool(conf.task_store_eager_result))
        if outcome.state == states.RETRY:
            retries += 1
            continue
        break
    state = states.FAILURE if outcome.state == states.REJECTED else outcome.state
    if outcome.state == states.FAILURE and (options.get("throw") or conf.task_eager_propagates):
        raise outcome.retval
    return EagerResult(task_id, outcome.retval, state, outcome.traceback, task_name=task.name)
