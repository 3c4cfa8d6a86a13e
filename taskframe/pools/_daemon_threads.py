"""A thread pool executor whose threads never hold up the worker's exit.

``concurrent.futures.ThreadPoolExecutor`` joins its threads when the interpreter
exits, so a synchronous task still running at a cold shutdown would keep the
process alive until it ends. The asyncio pool's default executor (asyncio
requires a ``ThreadPoolExecutor``) runs its work in daemon threads instead,
like the ``threads`` pool.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["DaemonThreadPoolExecutor"]

T = TypeVar("T")

_Item = tuple["concurrent.futures.Future[Any]", Callable[..., Any], tuple[Any, ...],
              dict[str, Any]]


class DaemonThreadPoolExecutor(concurrent.futures.ThreadPoolExecutor):
    """Up to ``max_workers`` daemon threads, started on demand, taking work from one queue."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "") -> None:
        super().__init__(max_workers, thread_name_prefix)  # never starts a thread itself
        self._limit = max_workers
        self._prefix = thread_name_prefix
        self._work: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._daemons: list[threading.Thread] = []
        self._idle_count = 0
        self._guard = threading.Lock()
        self._closed = False

    def submit(self, fn: Callable[..., T], /, *args: Any,
               **kwargs: Any) -> concurrent.futures.Future[T]:
        """Run ``fn(*args, **kwargs)`` in one of the threads."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._guard:
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if self._idle_count:
                self._idle_count -= 1
            elif len(self._daemons) < self._limit:
                thread = threading.Thread(target=self._run, daemon=True,
                                          name=f"{self._prefix}_{len(self._daemons)}")
                self._daemons.append(thread)
                thread.start()
            self._work.put((future, fn, args, kwargs))
        return future

    def _run(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            future, fn, args, kwargs = item
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            del item, future, fn, args, kwargs
            with self._guard:
                self._idle_count += 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """End the threads once the queued work is done (cancelled with ``cancel_futures``)."""
        with self._guard:
            self._closed = True
            daemons = list(self._daemons)
        if cancel_futures:
            while True:
                try:
                    item = self._work.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        for _ in daemons:
            self._work.put(None)
        if wait:
            for thread in daemons:
                thread.join()
