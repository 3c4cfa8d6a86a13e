"""Wedge detection: a worker that holds work and makes no progress.

A worker can be alive (its process runs, it answers ``inspect ping``) and yet do
nothing: a consumer loop stuck in a hook or a dead socket, an ``async def`` task
that blocks the asyncio pool's event loop with a synchronous call, a prefork pool
whose fork server no longer answers. ``ProgressWatch`` tells these apart from a
worker that is merely busy; ``Watchdog`` checks it about every second in a thread
of its own, logs each stall once, and, with ``worker_watchdog``, ends the process
with ``EX_WEDGED`` so that systemd or Kubernetes starts a new worker.

What counts as *stalled*, with ``timeout`` = ``worker_health_timeout``:

``loop``
    The consumer loop has not turned for ``timeout`` seconds (it turns at least
    twice a second while it runs). Not during a warm shutdown, when it waits for
    running tasks on purpose, nor while it reconnects to the broker: that is what it
    should do, and a restart would lose what the worker holds on Redis and SQL and
    could not connect either (the log says "Broker unreachable ... Trying again").
``pool``
    Jobs handed to the pool, or reserved for it, wait for a slot while a slot is
    free (fewer jobs started than ``concurrency``), and no job started or ended for
    ``timeout`` seconds.
``time_limit``
    A job has run ``timeout`` seconds past its hard time limit on a pool that
    enforces time limits (prefork, gevent, eventlet, asyncio): the pool did not
    stop it.

What does not count: every slot busy with a task that started, however long it
runs (bound tasks with a hard time limit if a hung one must be seen); a task past
its time limit on ``solo`` or ``threads`` (they cannot stop a thread); messages
waiting for their ETA or a rate limit; an idle worker. A pool that lost one slot
while its other slots keep starting and ending jobs still makes progress.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from taskframe.worker.consumer import Consumer

__all__ = ["EX_WEDGED", "LOOP", "POOL", "TIME_LIMIT", "ProgressWatch", "Stall", "Watchdog"]

logger = logging.getLogger("taskframe.worker.watchdog")

#: The exit code of a worker the watchdog ended (``EX_TEMPFAIL``: try again).
EX_WEDGED = 75

LOOP, POOL, TIME_LIMIT = "loop", "pool", "time_limit"

#: Seconds the shutdown the watchdog starts may take before the process exits anyway.
EXIT_GRACE = 15.0


@dataclass(frozen=True)
class Stall:
    """Why the worker counts as stalled.

    Attributes:
        kind: ``"loop"``, ``"pool"`` or ``"time_limit"`` (see the module docstring).
        seconds: how long it has lasted.
        detail: one line for logs and probes.
    """

    kind: str
    seconds: float
    detail: str

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape (health endpoint, ``inspect stats``)."""
        return {"kind": self.kind, "seconds": round(self.seconds, 1), "detail": self.detail}


class ProgressWatch:
    """Decides, one ``check()`` at a time, whether a worker's consumer and pool progress.

    The pool rule needs history: a check remembers how many jobs had started and
    ended, and since when jobs wait with a slot free and none started or ended.

    Args:
        consumer: the worker's ``Consumer``.
        timeout: seconds without progress before a stall (``worker_health_timeout``).
    """

    def __init__(self, consumer: Consumer, timeout: float) -> None:
        self.consumer = consumer
        self.timeout = float(timeout)
        self._marker: tuple[int, int] = (-1, -1)
        self._since = time.monotonic()

    def loop_age(self) -> float:
        """Seconds since the consumer loop's last turn (0 during a warm shutdown or a
        reconnection)."""
        if self.consumer.stopping or self.consumer.reconnecting:
            return 0.0
        return max(0.0, time.monotonic() - self.consumer.last_turn)

    def check(self) -> Stall | None:
        """The stall now, or ``None`` while the worker progresses (call about every second)."""
        return self._loop() or self._pool() or self._time_limit()

    def _loop(self) -> Stall | None:
        age = self.loop_age()
        if age < self.timeout:
            return None
        return Stall(LOOP, age, f"the consumer loop has not turned for {age:.0f} s")

    def _pool(self) -> Stall | None:
        consumer, now = self.consumer, time.monotonic()
        requests = list(consumer.active.values())  # a copy: pool threads change it
        started = sum(1 for r in requests if r.started)
        # Reserved requests wait too: an early-ack one is held back until a slot is ready.
        waiting = len(requests) - started + len(consumer.reserved)
        free = consumer.pool.concurrency - started
        marker = (sum(consumer.total_counts().values()), consumer.processed)
        if marker != self._marker or waiting <= 0 or free <= 0:
            self._marker, self._since = marker, now
            return None
        seconds = now - self._since
        if seconds < self.timeout:
            return None
        return Stall(POOL, seconds, f"{waiting} job(s) wait in the {consumer.pool.name} pool "
                     f"with {free} slot(s) free, and no job started or ended for "
                     f"{seconds:.0f} s")

    def _time_limit(self) -> Stall | None:
        consumer = self.consumer
        if not consumer.pool.enforces_time_limits:
            return None
        now, worst = time.time(), None
        for request in list(consumer.active.values()):
            job = request.job
            if not request.started or job is None or not job.time_limit \
                    or job.time_start is None:
                continue
            over = now - job.time_start - job.time_limit
            if over >= self.timeout and (worst is None or over > worst[0]):
                worst = (over, request, job.time_limit)
        if worst is None:
            return None
        over, request, limit = worst
        return Stall(TIME_LIMIT, over, f"{request.name}[{request.id}] has run {over:.0f} s "
                     f"past its hard time limit ({limit:g} s): the {consumer.pool.name} pool "
                     f"did not stop it")


class Watchdog:
    """Runs ``ProgressWatch.check()`` in a thread; reports stalls, and may end the worker.

    Args:
        watch: what to check.
        on_stall: called once, from this thread, at the first stall (``worker_watchdog``:
            the worker starts a cold shutdown); ``None`` only reports. The process then
            exits with ``EX_WEDGED`` after ``EXIT_GRACE`` seconds at the latest, for a
            shutdown that hangs on the wedged part.
    """

    def __init__(self, watch: ProgressWatch, *,
                 on_stall: Callable[[Stall], None] | None = None) -> None:
        self.watch = watch
        self.on_stall = on_stall
        self.interval = max(0.1, min(1.0, watch.timeout / 4))
        self.stall: Stall | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def status(self) -> dict[str, Any]:
        """``{"status": "ok" | "stalled", "stall": ...}`` as of the last check."""
        stall = self.stall
        return {"status": "ok" if stall is None else "stalled",
                "stall": None if stall is None else stall.as_dict(),
                "seconds_since_progress": round(self.watch.loop_age(), 3),
                "timeout": self.watch.timeout}

    def start(self) -> None:
        """Start checking."""
        self._thread = threading.Thread(target=self._run, name="taskframe-watchdog",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop checking (a shutdown the watchdog started still gets its deadline)."""
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                stall = self.watch.check()
            except Exception:  # the watch must outlive an odd state; log and look again
                logger.exception("watchdog: a check failed")
                continue
            self._report(stall)
            if stall is not None and self.on_stall is not None:
                self._end(stall, self.on_stall)
                return

    def _report(self, stall: Stall | None) -> None:
        before, self.stall = self.stall, stall
        if stall is not None and (before is None or before.kind != stall.kind):
            logger.error("worker stalled (%s): %s", stall.kind, stall.detail)
        elif stall is None and before is not None:
            logger.warning("worker progresses again (it was stalled: %s)", before.kind)

    def _end(self, stall: Stall, on_stall: Callable[[Stall], None]) -> None:
        logger.critical("watchdog: %s. Exiting with code %d (worker_watchdog) so that the "
                        "service manager starts a new worker.", stall.detail, EX_WEDGED)
        try:
            on_stall(stall)
        except Exception:
            logger.exception("watchdog: could not start the shutdown")
        # Not the stop event: this thread must end the process even after stop(), when
        # the shutdown itself hangs (on the wedged pool, at interpreter exit).
        time.sleep(EXIT_GRACE)
        logger.critical("watchdog: the shutdown did not end within %.0f s: exiting now",
                        EXIT_GRACE)
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):  # the line above must reach the log
                handler.flush()
        os._exit(EX_WEDGED)
