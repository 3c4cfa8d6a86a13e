"""The pool interface: where task bodies run.

The consumer loop hands the pool a ``Job`` (a callable that runs one request and
reports back through the consumer's completion queue). Pools differ only in
where that callable runs: in one thread (``solo``), several threads, processes,
greenlets or coroutines. Jobs never run in the consumer's own thread, so the
consumer keeps servicing the broker while they run.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, ClassVar

__all__ = ["Job", "Pool"]

Job = Callable[[], None]


class Pool(abc.ABC):
    """A bounded set of execution slots.

    Class attributes:
        name: the ``-P`` name.
    """

    name: ClassVar[str] = ""

    def __init__(self, concurrency: int) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        self.concurrency = concurrency

    @abc.abstractmethod
    def start(self) -> None:
        """Create the execution slots."""

    @abc.abstractmethod
    def submit(self, job: Job) -> None:
        """Queue ``job`` to run in a free slot; never runs it in the caller's thread."""

    @abc.abstractmethod
    def stop(self, *, wait: bool = True, timeout: float | None = None) -> None:
        """End the pool after the submitted jobs; with ``wait``, wait up to ``timeout``.

        The consumer only submits a job when a slot is free, so nothing waits
        inside a pool: reserved messages stay with the consumer, which gives
        them back to the broker on shutdown.
        """

    @property
    def free_slots(self) -> int:
        """How many more jobs can start now."""
        return max(0, self.concurrency - self.active)

    @property
    @abc.abstractmethod
    def active(self) -> int:
        """How many jobs are running now."""

    def stats(self) -> dict[str, Any]:
        """Numbers for ``inspect stats``."""
        return {"implementation": type(self).__name__, "max-concurrency": self.concurrency,
                "active": self.active}
