"""``RevokeSync``: a worker catches up on revokes it did not hear.

Revokes reach a running worker as broadcasts on the pidbox fanout exchange, and only
live subscribers get those: while its control link is down (a dropped connection, a
broker failover, a network cut), a worker misses them. Every revoke is also written to
the shared store (``RevokeStore``, in the result backend) by the client that sent it
and by each worker that heard it. This thread merges that store into the worker's
revoked set:

- at once when the control link comes back (``wake()``, called by ``ControlNode``);
- every ``worker_revoked_sync_interval`` seconds anyway (a revoke may be missed without
  the worker noticing a drop), cheaply: it reads the store's version token first (one
  small read) and loads the ids only when the token changed.

The ids it learns this way (and, at its first look, every id in the store) go to
``on_learned``: the worker stores REVOKED as their state unless it runs them, as it
does for a revoke it hears, so a task with an ETA later than every revoke memory still
finds it (``execution.revoked``). It runs in a thread of its own, so a slow result
store never delays remote control or the consumer loop.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from taskframe.control.revoked import RevokedSet, RevokeStore

__all__ = ["RevokeSync"]

logger = logging.getLogger("taskframe.control.revoke_sync")


class RevokeSync:
    """Merges the shared revoke store into a worker's revoked set, on demand and on a timer.

    Args:
        revoked: the worker's revoked set.
        store: the shared store.
        interval: seconds between two looks at the store (0: only after a reconnect).
        on_learned: called with the ids learned at a look (an error is logged).
    """

    def __init__(self, revoked: RevokedSet, store: RevokeStore, interval: float,
                 on_learned: Callable[[list[str]], None] | None = None) -> None:
        self.revoked = revoked
        self.store = store
        self.interval = interval
        self.on_learned = on_learned
        self._version: str | None = None
        self._first = True
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread; it looks at the store at once, then as said above."""
        self._thread = threading.Thread(target=self._run, name="taskframe-revoke-sync",
                                        daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Look at the store now (safe from any thread). Its version has changed if an id
        was added since the last look, whether or not this worker heard of it."""
        self._wake.set()

    def stop(self, timeout: float = 2.0) -> None:
        """End the thread."""
        self._stop.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        self._wake.set()  # the first look now
        while not self._stop.is_set():
            self._wake.wait(self.interval or None)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.sync()
            except Exception as exc:  # the store is down: try again at the next turn
                logger.warning("could not catch up on revoked ids: %r", exc)
                self._version = None

    def sync(self) -> int:
        """Merge the store's ids into the set if its version changed; return how many
        ids were new here."""
        version = self.store.version()
        if version is not None and version == self._version:
            return 0
        loaded = self.store.load()
        learned = [i for i in loaded if self._first or i not in self.revoked]
        added = self.revoked.update(loaded)
        self._version, self._first = version, False
        if added:
            logger.info("caught up on %d revoked task id(s) from the result backend", added)
        if learned and self.on_learned is not None:
            try:
                self.on_learned(learned)
            except Exception as exc:
                logger.warning("could not store REVOKED for %d caught-up id(s): %r",
                               len(learned), exc)
        return added
