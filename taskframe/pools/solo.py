"""The ``solo`` pool: one task at a time.

The task runs in one dedicated thread rather than in the consumer's own thread,
so that while a long task runs the consumer loop keeps the broker link alive
(AMQP heartbeats) and keeps its claims fresh (SQL and Redis visibility
timeouts): a long task on ``solo`` is never handed to a second worker.
"""

from __future__ import annotations

from taskframe.pools.threads import ThreadPool

__all__ = ["SoloPool"]


class SoloPool(ThreadPool):
    """A pool of exactly one slot."""

    name = "solo"

    def __init__(self, concurrency: int = 1) -> None:
        super().__init__(1)
