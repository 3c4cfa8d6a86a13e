"""Signals: named hooks with Celery's names and arguments.

``@task_success.connect`` registers a receiver; ``sender=`` limits it to one
sender: a task name or a task object for task signals; for worker signals
(sent by the ``Worker`` object) the worker object or its hostname. A
receiver's exception is logged and does not stop the task or the worker, except
for ``before_task_publish``, whose errors reach the caller.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar, overload

__all__ = [
    "Signal",
    "after_task_publish",
    "before_task_publish",
    "task_failure",
    "task_postrun",
    "task_prerun",
    "task_received",
    "task_rejected",
    "task_retry",
    "task_revoked",
    "task_success",
    "task_unknown",
    "worker_init",
    "worker_process_init",
    "worker_process_shutdown",
    "worker_ready",
    "worker_shutdown",
]

logger = logging.getLogger(__name__)

Receiver = Callable[..., Any]
F = TypeVar("F", bound=Receiver)


class Signal:
    """A named hook that receivers connect to."""

    def __init__(self, name: str, *, propagate_errors: bool = False) -> None:
        self.name = name
        self.propagate_errors = propagate_errors
        self._receivers: list[tuple[Receiver, Any]] = []
        self._lock = threading.Lock()

    @overload
    def connect(self, receiver: F, *, sender: Any = None) -> F: ...
    @overload
    def connect(self, receiver: None = None, *, sender: Any = None) -> Callable[[F], F]: ...

    def connect(self, receiver: F | None = None, *, sender: Any = None) -> F | Callable[[F], F]:
        """Register ``receiver``; usable as ``@sig.connect`` or ``@sig.connect(sender=...)``."""
        if receiver is None:
            def decorator(fn: F) -> F:
                return self.connect(fn, sender=sender)
            return decorator
        with self._lock:
            if not any(r is receiver and s == sender for r, s in self._receivers):
                self._receivers.append((receiver, sender))
        return receiver

    def disconnect(self, receiver: Receiver, *, sender: Any = None) -> None:
        """Remove ``receiver`` (registered with the same ``sender``)."""
        with self._lock:
            self._receivers = [
                (r, s) for r, s in self._receivers if not (r is receiver and s == sender)
            ]

    @property
    def receivers(self) -> list[Receiver]:
        """The connected receivers, in connection order."""
        return [r for r, _ in self._receivers]

    def send(self, sender: Any = None, **kwargs: Any) -> list[tuple[Receiver, Any]]:
        """Call every matching receiver with ``sender`` and ``kwargs``; return their results."""
        if not self._receivers:
            return []
        results: list[tuple[Receiver, Any]] = []
        for receiver, wanted in list(self._receivers):
            if wanted is not None and not _sender_matches(wanted, sender):
                continue
            try:
                results.append((receiver, receiver(sender=sender, signal=self, **kwargs)))
            except Exception as exc:
                if self.propagate_errors:
                    raise
                logger.exception("signal %s: receiver %r raised", self.name, receiver)
                results.append((receiver, exc))
        return results

    def __repr__(self) -> str:
        return f"<Signal {self.name}: {len(self._receivers)} receivers>"


def _sender_matches(wanted: Any, sender: Any) -> bool:
    if wanted == sender or wanted is sender:
        return True
    return bool(getattr(sender, "name", None) == wanted
                or getattr(sender, "hostname", None) == wanted
                or getattr(wanted, "name", None) == sender)


before_task_publish = Signal("before_task_publish", propagate_errors=True)
after_task_publish = Signal("after_task_publish")
task_received = Signal("task_received")
task_prerun = Signal("task_prerun")
task_postrun = Signal("task_postrun")
task_success = Signal("task_success")
task_failure = Signal("task_failure")
task_retry = Signal("task_retry")
task_revoked = Signal("task_revoked")
task_unknown = Signal("task_unknown")
task_rejected = Signal("task_rejected")
worker_init = Signal("worker_init")
worker_ready = Signal("worker_ready")
worker_shutdown = Signal("worker_shutdown")
worker_process_init = Signal("worker_process_init")
worker_process_shutdown = Signal("worker_process_shutdown")
