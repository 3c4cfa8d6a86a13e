"""taskframe: a Celery-compatible distributed task framework.

The public names below are imported lazily (PEP 562), so ``import
taskframe.transport`` does not import the app, the worker or the backends.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from taskframe import current as _current

__version__ = "0.1.0"

if TYPE_CHECKING:
    from taskframe.canvas import Signature, chain, chord, chunks, group, signature, xmap, xstarmap
    from taskframe.client.app import Celery, Taskframe, shared_task
    from taskframe.client.task import Task
    from taskframe.context import Context
    from taskframe.current import current_app
    from taskframe.errors import (
        Ignore,
        MaxRetriesExceededError,
        NotRegistered,
        Reject,
        Retry,
        SoftTimeLimitExceeded,
        TaskframeError,
        TaskRevokedError,
        TimeLimitExceeded,
        WorkerLostError,
    )
    from taskframe.log import get_task_logger
    from taskframe.result import AsyncResult, EagerResult, GroupResult, ResultSet
    from taskframe.worker.worker import Worker

_EXPORTS = {
    "AsyncResult": "taskframe.result",
    "Celery": "taskframe.client.app",
    "Context": "taskframe.context",
    "EagerResult": "taskframe.result",
    "GroupResult": "taskframe.result",
    "Ignore": "taskframe.errors",
    "MaxRetriesExceededError": "taskframe.errors",
    "NotRegistered": "taskframe.errors",
    "Reject": "taskframe.errors",
    "ResultSet": "taskframe.result",
    "Retry": "taskframe.errors",
    "Signature": "taskframe.canvas",
    "SoftTimeLimitExceeded": "taskframe.errors",
    "Task": "taskframe.client.task",
    "TaskRevokedError": "taskframe.errors",
    "Taskframe": "taskframe.client.app",
    "TaskframeError": "taskframe.errors",
    "TimeLimitExceeded": "taskframe.errors",
    "Worker": "taskframe.worker.worker",
    "WorkerLostError": "taskframe.errors",
    "chain": "taskframe.canvas",
    "chord": "taskframe.canvas",
    "chunks": "taskframe.canvas",
    "current_app": "taskframe.current",
    "get_task_logger": "taskframe.log",
    "group": "taskframe.canvas",
    "shared_task": "taskframe.client.app",
    "signature": "taskframe.canvas",
    "xmap": "taskframe.canvas",
    "xstarmap": "taskframe.canvas",
}

__all__ = [
    "AsyncResult",
    "Celery",
    "Context",
    "EagerResult",
    "GroupResult",
    "Ignore",
    "MaxRetriesExceededError",
    "NotRegistered",
    "Reject",
    "ResultSet",
    "Retry",
    "Signature",
    "SoftTimeLimitExceeded",
    "Task",
    "TaskRevokedError",
    "Taskframe",
    "TaskframeError",
    "TimeLimitExceeded",
    "Worker",
    "WorkerLostError",
    "__version__",
    "chain",
    "chord",
    "chunks",
    "current_app",
    "get_task_logger",
    "group",
    "shared_task",
    "signature",
    "xmap",
    "xstarmap",
]


def _default_app() -> Taskframe:
    app: Taskframe = importlib.import_module("taskframe.client.app").Taskframe("default")
    return app


# The root package sits above every layer: it tells the core how to make the default app
# that ``current_app()`` returns when a program created none (as Celery does).
_current.set_default_app_factory(_default_app)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'taskframe' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
