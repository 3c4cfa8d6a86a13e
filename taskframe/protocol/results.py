"""Result metas and exceptions as Celery stores them (../shared/spec/celery-wire.md §6.1-6.2, §7).

A *meta* is the dict every result backend stores per task: ``status``,
``result``, ``traceback``, ``children``, ``date_done``, ``task_id`` and, when
asked for, the group/parent ids and the ``result_extended`` fields. Exceptions
are stored as ``{"exc_type", "exc_message", "exc_module"}``.

Our exception classes that have a Celery twin are stored under Celery's names
(``celery.exceptions.Retry``, ``billiard.exceptions.TimeLimitExceeded``) so a
Celery client reads them back as its own classes, and those names read back here
as ours.

Security: ``decode_exception`` never imports anything. Stored data could name
``os.system``; only classes that are already loaded *and* derive from
``BaseException`` are ever called, anything else becomes an inert stand-in class
with the stored name.
"""

from __future__ import annotations

import builtins
import json
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypedDict

from taskframe import errors, states

__all__ = [
    "ResultContext",
    "ResultMeta",
    "decode_exception",
    "decode_result",
    "encode_exception",
    "flatten_ids",
    "group_tuple",
    "make_meta",
    "result_tuple",
]


class ResultMeta(TypedDict, total=False):
    """One stored task result, in Celery's layout (§6.1)."""

    status: str
    result: Any
    traceback: str | None
    children: list[Any]
    date_done: str | None
    task_id: str
    group_id: str
    parent_id: str
    name: str | None
    args: Any
    kwargs: Any
    worker: str | None
    retries: int | None
    queue: str | None


@dataclass
class ResultContext:
    """What the backend needs to know about the request a result belongs to.

    Attributes:
        name: task name (``result_extended``).
        args / kwargs: the call's arguments (``result_extended``).
        worker: the worker's nodename (``result_extended``).
        retries: how many times the task was retried (``result_extended``).
        queue: the routing key it was delivered with (``result_extended``).
        group_id: set when the task is a group member; stored as ``group_id``.
        parent_id: the task that published this one; stored as ``parent_id``.
        children: result tuples of tasks this one started (``result_tuple``).
        reply_to: the queue the sender reads replies from (the ``rpc`` backend
            publishes results there; nothing is sent when it is unset).
        correlation_id: the id replies carry (the task id when unset).
    """

    name: str | None = None
    args: list[Any] | None = None
    kwargs: dict[str, Any] | None = None
    worker: str | None = None
    retries: int | None = None
    queue: str | None = None
    group_id: str | None = None
    parent_id: str | None = None
    children: list[Any] = field(default_factory=list)
    reply_to: str | None = None
    correlation_id: str | None = None


def result_tuple(task_id: str, parent: list[Any] | None = None) -> list[Any]:
    """Celery's tuple for one result: ``[[task_id, parent_tuple], None]``."""
    return [[task_id, parent], None]


def group_tuple(group_id: str, children: list[Any],
                parent: list[Any] | None = None) -> list[Any]:
    """Celery's tuple for a group: ``[[group_id, parent_tuple], [child tuples...]]``."""
    return [[group_id, parent], list(children)]


def flatten_ids(result: Any) -> list[str]:
    """The task ids of Celery's result tuple, or of a list of them, in order.

    A group's tuple gives the ids of its children (nested groups flattened); any
    other value gives none.
    """
    if not isinstance(result, list | tuple):
        return []
    if _is_result_tuple(result):
        head, nested = result
        if nested:
            return [tid for child in nested for tid in flatten_ids(child)]
        return [str(head[0])]
    return [tid for item in result for tid in flatten_ids(item)]


def _is_result_tuple(value: Sequence[Any]) -> bool:
    """``[[id, parent], children]``: Celery's serialized result."""
    return (len(value) == 2 and isinstance(value[0], list | tuple) and len(value[0]) == 2
            and isinstance(value[0][0], str))


def make_meta(
    task_id: str,
    state: str,
    result: Any,
    *,
    traceback: str | None = None,
    context: ResultContext | None = None,
    extended: bool = False,
) -> ResultMeta:
    """Build the meta to store for ``task_id``.

    Args:
        task_id: the task's id.
        state: one of ``taskframe.states``.
        result: the return value, or the exception for RETRY/FAILURE/REVOKED
            (encoded with ``encode_exception``).
        traceback: formatted traceback text, for exception states.
        context: the request; gives ``children``, ``group_id``, ``parent_id``
            and the extended fields.
        extended: add ``name``/``args``/``kwargs``/``worker``/``retries``/
            ``queue`` (``result_extended``); needs ``context``.
    """
    if isinstance(result, BaseException):
        result = encode_exception(result)
    date_done = datetime.now(UTC).isoformat() if state in states.READY_STATES else None
    meta: ResultMeta = {
        "status": state,
        "result": result,
        "traceback": traceback,
        "children": list(context.children) if context else [],
        "date_done": date_done,
    }
    if context is not None:
        if context.group_id:
            meta["group_id"] = context.group_id
        if context.parent_id:
            meta["parent_id"] = context.parent_id
        if extended:
            meta["name"] = context.name
            meta["args"] = context.args
            meta["kwargs"] = context.kwargs
            meta["worker"] = context.worker
            meta["retries"] = context.retries
            meta["queue"] = context.queue
    meta["task_id"] = task_id
    return meta


def decode_result(meta: Mapping[str, Any]) -> Any:
    """The value a meta holds: the result, or the exception for exception states."""
    result = meta.get("result")
    if meta.get("status") in states.EXCEPTION_STATES:
        if isinstance(result, BaseException):  # pickle-serialized backends
            return result
        if isinstance(result, Mapping) and "exc_type" in result:
            return decode_exception(result)
    return result


# -- exceptions -------------------------------------------------------------------------

_CELERY = "celery.exceptions"
_BILLIARD = "billiard.exceptions"

# Our classes that Celery has too, with the module Celery stores them under.
_TO_CELERY: dict[type[BaseException], str] = {
    errors.Retry: _CELERY,
    errors.Reject: _CELERY,
    errors.Ignore: _CELERY,
    errors.NotRegistered: _CELERY,
    errors.TaskRevokedError: _CELERY,
    errors.MaxRetriesExceededError: _CELERY,
    errors.ChordError: _CELERY,
    errors.TimeoutError: _CELERY,
    errors.InvalidTaskError: _CELERY,
    errors.ImproperlyConfigured: _CELERY,
    errors.SoftTimeLimitExceeded: _BILLIARD,
    errors.TimeLimitExceeded: _BILLIARD,
    errors.WorkerLostError: _BILLIARD,
}

# Read back: Celery's names (celery.exceptions re-exports billiard's) -> our classes.
_FROM_CELERY: dict[tuple[str, str], type[BaseException]] = {
    (module, cls.__qualname__): cls for cls, module in _TO_CELERY.items()
}
for _cls in (errors.SoftTimeLimitExceeded, errors.TimeLimitExceeded, errors.WorkerLostError):
    _FROM_CELERY[(_CELERY, _cls.__qualname__)] = _cls
_FROM_CELERY[(_CELERY, "RetryTaskError")] = errors.Retry

_STAND_INS: dict[tuple[str, str], type[Exception]] = {}
_STAND_INS_LOCK = threading.Lock()


def _json_safe(value: Any) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError, OverflowError, RecursionError):
        try:
            return repr(value)
        except Exception:  # a broken __repr__ must not lose the failure
            return f"<unrepresentable {type(value).__name__}>"
    return value


def encode_exception(exc: BaseException) -> dict[str, Any]:
    """Encode ``exc`` as Celery does for JSON-like serializers.

    Returns:
        ``{"exc_type": qualname, "exc_message": [args...], "exc_module": module}``;
        arguments JSON cannot hold are stored as their ``repr``.
    """
    cls = type(exc)
    module = _TO_CELERY.get(cls, cls.__module__)
    return {
        "exc_type": cls.__qualname__,
        "exc_message": [_json_safe(arg) for arg in exc.args],
        "exc_module": module,
    }


def _stand_in(module: str, qualname: str) -> type[Exception]:
    """An inert ``Exception`` subclass named like the stored class (cached)."""
    key = (module, qualname)
    with _STAND_INS_LOCK:
        cls = _STAND_INS.get(key)
        if cls is None:
            name = qualname.rpartition(".")[2] or "UnknownException"
            cls = type(name, (Exception,), {"__module__": module, "__qualname__": qualname})
            _STAND_INS[key] = cls
        return cls


def _lookup(module: str, qualname: str) -> Any:
    """The already-loaded object ``module.qualname``, or ``None``. Imports nothing."""
    known = _FROM_CELERY.get((module, qualname))
    if known is not None:
        return known
    owner: Any = builtins if module == "builtins" else sys.modules.get(module)
    if owner is None:
        return None
    for part in qualname.split("."):
        # Only plain attribute reads, never calls; dunder names could walk to any object.
        if not part or (part.startswith("__") and part.endswith("__")):
            return None
        owner = getattr(owner, part, None)
        if owner is None:
            return None
    return owner


def decode_exception(data: Mapping[str, Any]) -> BaseException:
    """Rebuild an exception stored by ``encode_exception`` (ours or Celery's).

    The class is found among builtins, Celery/billiard names mapped to our
    classes, and modules already in ``sys.modules``; it must be a
    ``BaseException`` subclass. Otherwise, or if it cannot be constructed from
    ``exc_message``, an ``Exception`` subclass with the stored name and module
    stands in, so ``type(e).__name__`` still matches.
    """
    qualname = data.get("exc_type")
    if not isinstance(qualname, str) or not qualname:
        qualname = "UnknownException"
    module = data.get("exc_module")
    if not isinstance(module, str) or not module:
        module = _CELERY  # what Celery does with a missing module
    message = data.get("exc_message", "")
    args: tuple[Any, ...] = tuple(message) if isinstance(message, list | tuple) else (message,)

    cls = _lookup(module, qualname)
    if isinstance(cls, type) and issubclass(cls, BaseException):
        try:
            return cls(*args)
        except Exception:  # any constructor may refuse stored args
            pass
    return _stand_in(module, qualname)(*args)
