"""The ``solo`` pool: one task at a time.

The task runs in one dedicated thread rather than in the consumer's own thread,
so that while a long task runs the consumer loop keeps the broker link alive
(AMQP heartbeats) and keeps its claims fresh (SQL and Redis visibility
timeouts): a long task on ``solo`` is never handed to a second worker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from taskframe.errors import PoolError
from taskframe.pools.threads import ThreadPool

if TYPE_CHECKING:
    from taskframe.client.app import Taskframe

__all__ = ["SoloPool"]


class SoloPool(ThreadPool):
    """A pool of exactly one slot."""

    name = "solo"
    # Early acks: the slot writes its job's ack, so a job waits ready for it (the loop
    # writing them made the slot wait for the loop's next turn after each task).
    acks_in_slot = True

    def __init__(self, concurrency: int = 1, *, app: Taskframe | None = None) -> None:
        super().__init__(1, app=app)

    def grow(self, n: int = 1) -> None:
        """The solo pool has exactly one slot."""
        raise PoolError("the solo pool has exactly one slot")

    def shrink(self, n: int = 1) -> None:
        """The solo pool has exactly one slot."""
        raise PoolError("the solo pool has exactly one slot")
