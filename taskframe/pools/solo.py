"""The ``solo`` pool: run each task inline, in the consumer's thread, one at a time."""

from __future__ import annotations

from taskframe.pools.base import Job, Pool

__all__ = ["SoloPool"]


class SoloPool(Pool):
    """Runs a job before ``submit`` returns: concurrency is always 1."""

    name = "solo"
    blocking_submit = True

    def __init__(self, concurrency: int = 1) -> None:
        super().__init__(1)
        self._active = 0

    def start(self) -> None:
        """Nothing to create."""

    def submit(self, job: Job) -> None:
        """Run ``job`` now."""
        self._active = 1
        try:
            job()
        finally:
            self._active = 0

    def stop(self, *, wait: bool = True, timeout: float | None = None) -> None:
        """Nothing runs outside ``submit``."""

    @property
    def active(self) -> int:
        """1 while a job runs."""
        return self._active
