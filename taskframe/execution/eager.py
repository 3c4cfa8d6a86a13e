"""Eager runs: ``Task.apply()`` and ``task_always_eager``, here and now, through the executor."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from taskframe import states
from taskframe.context import Context
from taskframe.execution.executor import execute
from taskframe.result import EagerResult

if TYPE_CHECKING:
    from taskframe.client.task import Task

__all__ = ["run_eager"]


def run_eager(task: Task[Any, Any], args: list[Any], kwargs: dict[str, Any],
              options: dict[str, Any]) -> EagerResult[Any]:
    """Run ``task`` here and now (``apply()``); retries run at once, in a loop."""
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
