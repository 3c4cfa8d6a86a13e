"""taskframe: a Celery-compatible distributed task framework.

The public names below are imported lazily (PEP 562), so ``import
taskframe.transport`` does not import the app, the worker or the backends.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from taskframe.app import Celery, Taskframe, current_app, shared_task
    from taskframe.canvas import Signature, chain, chord, chunks, group, signature, xmap, xstarmap
    from taskframe.context import Context
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
    from taskframe.result import AsyncResult, EagerResult
    from taskframe.result_group import GroupResult, ResultSet
    from taskframe.task import Task
    from taskframe.worker.worker import Worker

_EXPORTS = {
    "AsyncResult": "taskframe.result",
    "Celery": "taskframe.app",
    "Context": "taskframe.context",
    "EagerResult": "taskframe.result",
    "GroupResult": "taskframe.result_group",
    "Ignore": "taskframe.errors",
    "MaxRetriesExceededError": "taskframe.errors",
    "NotRegistered": "taskframe.errors",
    "Reject": "taskframe.errors",
    "ResultSet": "taskframe.result_group",
    "Retry": "taskframe.errors",
    "Signature": "taskframe.canvas",
    "SoftTimeLimitExceeded": "taskframe.errors",
    "Task": "taskframe.task",
    "TaskRevokedError": "taskframe.errors",
    "Taskframe": "taskframe.app",
    "TaskframeError": "taskframe.errors",
    "TimeLimitExceeded": "taskframe.errors",
    "Worker": "taskframe.worker.worker",
    "WorkerLostError": "taskframe.errors",
    "chain": "taskframe.canvas",
    "chord": "taskframe.canvas",
    "chunks": "taskframe.canvas",
    "current_app": "taskframe.app",
    "get_task_logger": "taskframe.log",
    "group": "taskframe.canvas",
    "shared_task": "taskframe.app",
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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'taskframe' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
