"""The Lamport clock stamped on remote-control messages and events (Celery's ``clock``)."""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["LamportClock"]


class LamportClock:
    """A logical clock: ``forward()`` before sending, ``adjust(other)`` on receipt.

    One instance may be shared by a worker's remote control and its events.
    """

    def __init__(self, value: int = 0) -> None:
        self.value = value
        self._lock = threading.Lock()

    def forward(self) -> int:
        """Tick once for a message sent; return the new value."""
        with self._lock:
            self.value += 1
            return self.value

    def adjust(self, other: Any) -> int:
        """Move past a clock value received from a peer (unreadable: as 0); return the
        new value."""
        try:
            seen = int(other or 0)
        except (TypeError, ValueError):
            seen = 0
        with self._lock:
            self.value = max(self.value, seen) + 1
            return self.value
