"""``self.request``: what a running task knows about its own invocation.

The worker (or ``Task.apply`` when eager) pushes a ``Context`` for the duration
of one run; it lives in a ``ContextVar`` so threads, greenlets and coroutines
each see their own.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

__all__ = ["Context", "current_request", "request_context"]


@dataclass
class Context:
    """The request of one task run (Celery's ``Task.request``)."""

    id: str | None = None
    task: str | None = None
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    retries: int = 0
    hostname: str | None = None
    delivery_info: dict[str, Any] = field(default_factory=dict)
    eta: datetime | None = None
    expires: datetime | None = None
    root_id: str | None = None
    parent_id: str | None = None
    group: str | None = None
    group_index: int | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    origin: str | None = None
    is_eager: bool = False
    called_directly: bool = True
    ignore_result: bool = False
    timelimit: tuple[float | None, float | None] = (None, None)
    callbacks: list[dict[str, Any]] | None = None
    errbacks: list[dict[str, Any]] | None = None
    chain: list[dict[str, Any]] | None = None
    chord: dict[str, Any] | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    priority: int | None = None
    shadow: str | None = None
    stamps: dict[str, Any] = field(default_factory=dict)
    abort_reason: str | None = None
    _abort: threading.Event = field(default_factory=threading.Event, repr=False)

    def should_abort(self) -> bool:
        """True once the worker asked this task to stop.

        Long-running tasks check it and return early. ``abort_reason`` says why:
        ``"shutdown"`` at the soft-shutdown deadline (revoke will use
        ``"revoked"`` once remote control lands).
        """
        return self._abort.is_set()

    def request_abort(self, reason: str) -> None:
        """Ask the task to stop; used by the worker."""
        self.abort_reason = reason
        self._abort.set()

    def get(self, key: str, default: Any = None) -> Any:
        """Celery-style ``request.get('name')``."""
        return getattr(self, key, default)


_current: ContextVar[Context | None] = ContextVar("taskframe_request", default=None)


def current_request() -> Context | None:
    """The request of the task running in this thread/coroutine, or None."""
    return _current.get()


@contextlib.contextmanager
def request_context(ctx: Context) -> Iterator[Context]:
    """Make ``ctx`` the current request while the block runs."""
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)
