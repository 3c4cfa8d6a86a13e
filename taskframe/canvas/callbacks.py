"""When a canvas fails: errbacks called, the steps it will never send marked as failed.

Used where a task's failure ends its canvas early: the executor (a task that failed),
a chord whose header failed (``canvas.chord_completion``) and ``celery.chord_unlock``.
"""

from __future__ import annotations

import inspect
import logging
import traceback as tb_module
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from taskframe.canvas.chords import chord
from taskframe.canvas.primitives import chain, group
from taskframe.canvas.signatures import Signature, _new_id, as_list
from taskframe.context import Context

if TYPE_CHECKING:
    from taskframe.client.app import Taskframe
    from taskframe.client.task import Task

__all__ = ["call_errbacks", "fail_chain", "fail_signature", "takes_request"]

logger = logging.getLogger("taskframe.chord")


def fail_signature(app: Taskframe, sig: Signature, exc: BaseException) -> None:
    """Store ``exc`` as the outcome of every task ``sig`` would have run; call errbacks."""
    einfo = "".join(tb_module.format_exception(exc))
    if isinstance(sig, chain):
        steps = sig.tasks
        for step in steps:
            fail_signature(app, step, exc)
        return
    if isinstance(sig, group):
        for member in sig.tasks:
            fail_signature(app, member, exc)
        return
    if isinstance(sig, chord):
        body = sig.body
        if body is not None:
            fail_signature(app, body, exc)
        return
    task_id = sig.id or _new_id()
    try:
        app.backend.mark_as_failure(task_id, exc, traceback=einfo)
    except Exception:
        logger.exception("could not store the failure of %s", task_id)
    request = Context(id=task_id, task=sig.name, args=sig.args, kwargs=dict(sig.kwargs),
                      root_id=sig.options.get("root_id"), group=sig.options.get("group_id"),
                      called_directly=False)
    call_errbacks(app, as_list(sig.options.get("link_error") or ()), request, exc, einfo)
    fail_chain(app, sig.options.get("chain"), exc, einfo)


def fail_chain(app: Taskframe, embedded: Iterable[Mapping[str, Any]] | None,
               exc: BaseException, einfo: str) -> None:
    """Mark the steps a failed task will never send as failed (Celery's ``_fail_chain``)."""
    for step in embedded or ():
        task_id = (step.get("options") or {}).get("task_id")
        if not task_id:
            continue
        try:
            app.backend.mark_as_failure(str(task_id), exc, traceback=einfo)
        except Exception:
            logger.exception("could not store the failure of chain step %s", task_id)


def call_errbacks(app: Taskframe, errbacks: Iterable[Mapping[str, Any]] | None, request: Context,
                  exc: BaseException, einfo: str) -> None:
    """Call each errback: in-process with ``(request, exc, traceback)`` when its function
    takes more than one positional argument (Celery's rule), else send it with the
    failed task's id."""
    for data in errbacks or ():
        sig = Signature.from_dict(data, app=app)
        local = app.tasks.get(sig.name)
        try:
            if sig.subtask_type is None and local is not None and takes_request(local):
                local.run(request, exc, einfo, *sig.args, **sig.kwargs)
            else:
                sig.apply_async((request.id,), parent_id=request.id,
                                root_id=request.root_id or request.id)
        except Exception:
            logger.exception("errback %r of %s[%s] raised", sig, request.task, request.id)


def takes_request(task: Task[Any, Any]) -> bool:
    """Celery calls an errback in-process with (request, exc, traceback) when its
    function takes more than one positional argument."""
    fn = getattr(task, "__wrapped__", None)
    if fn is None:
        return False
    params = [p for p in inspect.signature(fn).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    bound = 1 if getattr(task, "_bind", False) else 0
    return len(params) - bound > 1
