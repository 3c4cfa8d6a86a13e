"""The ``eventlet`` pool: ``-P eventlet -c 1000``, one green thread per task.

Like the ``gevent`` pool, with eventlet: the ``taskframe`` command monkey-patches
the process when it sees ``-P eventlet`` on its command line. Time limits use
``eventlet.Timeout``; ``terminate`` kills the green thread. An ``async def``
task runs in eventlet's native thread pool (``eventlet.tpool``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import eventlet
from eventlet import patcher

from taskframe.errors import ImproperlyConfigured
from taskframe.pools._green import GreenletPool

if TYPE_CHECKING:
    from taskframe.pools._green import _Timer
    from taskframe.pools.base import TaskJob

__all__ = ["EventletPool"]


class EventletPool(GreenletPool):
    """Jobs in green threads of an ``eventlet.GreenPool``."""

    name = "eventlet"

    def _check_patched(self) -> None:
        if not patcher.is_monkey_patched("socket"):
            raise ImproperlyConfigured(
                "the eventlet pool needs a monkey-patched process: start the worker with "
                "`taskframe worker -P eventlet` (the command patches before importing "
                "anything), or call eventlet.monkey_patch() first thing yourself")

    def start(self) -> None:
        """Check the patching; create the green pool."""
        self._check_patched()
        self._pool = eventlet.GreenPool(self.concurrency)

    def grow(self, n: int = 1) -> None:
        """Allow ``n`` more green threads at once."""
        super().grow(n)
        self._pool.resize(self.concurrency)

    def shrink(self, n: int = 1) -> None:
        """Allow ``n`` fewer green threads at once (running ones finish)."""
        super().shrink(n)
        self._pool.resize(self.concurrency)

    def _spawn(self, job: TaskJob) -> Any:
        return self._pool.spawn(self._run, job)

    def _start_timeout(self, seconds: float, exc: BaseException) -> _Timer:
        timer: _Timer = eventlet.Timeout(seconds, exc)
        return timer

    def _kill(self, greenlet: Any, exc: BaseException | None) -> None:
        if exc is None:
            greenlet.kill()
        else:
            greenlet.kill(exc)

    def _join(self, greenlets: list[Any], timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while any(not g.dead for g in greenlets):
            if deadline is not None and time.monotonic() >= deadline:
                return
            eventlet.sleep(0.02)
