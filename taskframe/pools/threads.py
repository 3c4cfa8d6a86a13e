"""The ``threads`` pool: ``-c N`` threads take jobs from one queue.

Good for I/O-bound tasks. Time limits are not enforced on this pool (a thread
cannot be stopped from outside); long tasks check ``self.request.should_abort()``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from taskframe.pools.base import Job, Pool

__all__ = ["ThreadPool"]

logger = logging.getLogger("taskframe.pools.threads")

_STOP = None


class ThreadPool(Pool):
    """N daemon threads running jobs from a FIFO queue."""

    name = "threads"

    def __init__(self, concurrency: int) -> None:
        super().__init__(concurrency)
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._active = 0
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the threads."""
        for n in range(self.concurrency):
            thread = threading.Thread(target=self._work, name=f"taskframe-thread-{n}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            with self._lock:
                self._active += 1
            try:
                job()
            except BaseException:  # a job reports its own errors; this is a last resort
                logger.exception("job crashed in the thread pool")
            finally:
                with self._lock:
                    self._active -= 1

    def submit(self, job: Job) -> None:
        """Queue ``job`` for the next free thread."""
        self._jobs.put(job)

    def stop(self, *, wait: bool = True, timeout: float | None = None) -> None:
        """Let queued jobs run, then end the threads (joined with ``wait``)."""
        for _ in self._threads:
            self._jobs.put(_STOP)
        if wait:
            deadline = None if timeout is None else time.monotonic() + timeout
            for thread in self._threads:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                thread.join(remaining)

    @property
    def active(self) -> int:
        """Jobs running now."""
        return self._active
