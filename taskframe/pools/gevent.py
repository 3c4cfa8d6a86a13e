"""The ``gevent`` pool: ``-P gevent -c 1000``, one greenlet per task.

For I/O-bound tasks: thousands wait on sockets at once in one process. The
worker must be monkey-patched before anything else is imported; the
``taskframe`` command does it when it sees ``-P gevent`` (or ``--pool=gevent``)
on its command line, so the pool cannot be chosen by ``worker_pool`` alone.
Time limits use ``gevent.Timeout``; ``terminate`` kills the greenlet. An
``async def`` task runs in gevent's native thread pool, sized to ``-c``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import gevent
import gevent.pool
from gevent import monkey

from taskframe.errors import ImproperlyConfigured
from taskframe.pools._green import GreenletPool

if TYPE_CHECKING:
    from taskframe.pools._green import _Timer
    from taskframe.pools.base import TaskJob

__all__ = ["GeventPool"]


class GeventPool(GreenletPool):
    """Jobs in greenlets of a ``gevent.pool.Pool``."""

    name = "gevent"

    def _check_patched(self) -> None:
        if not monkey.is_module_patched("socket"):
            raise ImproperlyConfigured(
                "the gevent pool needs a monkey-patched process: start the worker with "
                "`taskframe worker -P gevent` (the command patches before importing "
                "anything), or call gevent.monkey.patch_all() first thing yourself")

    def start(self) -> None:
        """Check the patching; create the greenlet pool."""
        self._check_patched()
        self._pool = gevent.pool.Pool(self.concurrency)
        threadpool = gevent.get_hub().threadpool  # where async def tasks run
        threadpool.maxsize = max(threadpool.maxsize, self.concurrency)

    def grow(self, n: int = 1) -> None:
        """Allow ``n`` more greenlets at once."""
        super().grow(n)
        self._resize()

    def shrink(self, n: int = 1) -> None:
        """Allow ``n`` fewer greenlets at once (running ones finish)."""
        super().shrink(n)
        self._resize()

    def _resize(self) -> None:
        # A gevent Pool's size is fixed: new jobs go to a new one (jobs of the old one
        # are still tracked in self._greenlets until they end).
        self._pool = gevent.pool.Pool(self.concurrency)

    def _spawn(self, job: TaskJob) -> Any:
        return self._pool.spawn(self._run, job)

    def _start_timeout(self, seconds: float, exc: BaseException) -> _Timer:
        timer: _Timer = gevent.Timeout.start_new(seconds, exc)
        return timer

    def _kill(self, greenlet: Any, exc: BaseException | None) -> None:
        if exc is None:
            greenlet.kill(block=False)
        else:
            greenlet.kill(exc, block=False)

    def _join(self, greenlets: list[Any], timeout: float | None) -> None:
        gevent.joinall(greenlets, timeout=timeout)
