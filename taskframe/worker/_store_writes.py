"""Result-store writes the consumer loop hands off instead of waiting for them.

The loop settles the messages it does not run (expired, revoked, an unknown task) only
after the result store holds their outcome (REVOKED, FAILURE), so a crash in between
delivers them again rather than leaving their state unwritten. But a store that is slow
or down must not stall the loop: the same thread services AMQP heartbeats and Redis and
SQL claim refresh, and a loop stalled on the store makes the broker redeliver what the
worker holds. So the writes run on one thread of their own, in order, and each hands
its settle back to the loop's thread (``Consumer.call_soon``) once done. Task results
are written where the task ran (pool threads, the prefork supervisor), never here.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

__all__ = ["StoreWrites"]

logger = logging.getLogger("taskframe.worker.consumer")


class StoreWrites:
    """One daemon thread that runs writes, then queues their follow-up on the loop.

    Args:
        call_soon: runs a callable on the consumer loop's thread at its next turn.
    """

    def __init__(self, call_soon: Callable[[Callable[[], None]], None]) -> None:
        self._call_soon = call_soon
        self._queue: queue.SimpleQueue[tuple[Callable[[], None], Callable[[], None]]] = (
            queue.SimpleQueue())
        self._lock = threading.Lock()
        self._pending = 0
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        """Writes submitted whose follow-up has not run on the loop yet."""
        return self._pending

    def submit(self, write: Callable[[], None], then: Callable[[], None]) -> None:
        """Run ``write`` on the store thread, then ``then`` on the loop's thread.

        ``write`` handles its own errors (a store that is down is logged, and the
        message is settled all the same); ``then`` runs whatever ``write`` did.
        """
        with self._lock:
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="store-writes",
                                                daemon=True)
                self._thread.start()
        self._queue.put((write, then))

    def _run(self) -> None:
        while True:
            write, then = self._queue.get()
            try:
                write()
            except Exception:
                logger.exception("a result-store write of the consumer failed")
            self._call_soon(self._finisher(then))

    def _finisher(self, then: Callable[[], None]) -> Callable[[], None]:
        def finish() -> None:
            with self._lock:
                self._pending -= 1
            then()
        return finish
