"""The receive loop: the only code that touches the consuming broker connection.

One loop, in the worker's main thread:

1. settle what the pool reported (acks, rejects) since the last turn,
2. start reserved requests while the pool has free slots,
3. poll the broker for more messages, up to the prefetch bound,
4. every second, ``transport.maintain()`` (heartbeats, claim refresh).

Pool threads never touch the connection: they put ``(request, action)`` on a
thread-safe queue that the loop drains (py-amqp channels are not thread-safe).

``Consumer`` holds the state and runs the loop, the pool's slots and shutdown.
Its other parts are mixin bases, one module each; they work on the same state,
and the loop reaches them by plain method calls on ``self`` (nothing more per
message than when they were all written here):

- ``_consumer_intake.Intake``: a received message decoded into a reserved
  ``Request``, or rejected (undecodable, unknown task), or skipped (expired, revoked);
- ``_consumer_timers.Timers``: ETA timers, rate-limit holds, far-future ETAs
  given back to the broker;
- ``_consumer_settle.Settling``: acks, rejects and requeues; what pool threads report;
- ``_consumer_reconnect.Reconnection``: consuming, and again after connection loss.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from taskframe.errors import TransportError
from taskframe.pools.base import TaskJob
from taskframe.transport.base import MessageState
from taskframe.transport.errors import BrokerConnectionError, ConnectionLost
from taskframe.worker._consumer_intake import Intake
from taskframe.worker._consumer_reconnect import Reconnection
from taskframe.worker._consumer_settle import REQUEUE, Settling
from taskframe.worker._consumer_timers import Timers
from taskframe.worker._store_writes import StoreWrites
from taskframe.worker.ratelimit import RateLimits

if TYPE_CHECKING:
    from taskframe.client.app import Taskframe
    from taskframe.control.revoked import RevokedSet
    from taskframe.pools.base import Pool
    from taskframe.transport import Connection, Queue
    from taskframe.worker.request import Request

__all__ = ["Consumer"]

logger = logging.getLogger("taskframe.worker.consumer")


class Consumer(Intake, Timers, Settling, Reconnection):
    """Receives task messages, hands them to the pool, settles them.

    The bases are parts of this one object (see the module docstring), not components
    of their own: they share the state set up here, each listing the part it uses.
    """

    def __init__(self, app: Taskframe, connection: Connection, queues: list[Queue], pool: Pool,
                 *, hostname: str, prefetch_count: int) -> None:
        self.app = app
        self.connection = connection
        self.queues = queues
        self.pool = pool
        self.hostname = hostname
        self.prefetch_count = prefetch_count
        self.accept = tuple(app.conf.accept_content)
        limit = app.conf.worker_max_message_size
        self.max_message_size: int | None = int(limit) if limit else None
        deliveries = app.conf.worker_delivery_limit
        self.delivery_limit: int | None = int(deliveries) if deliveries else None
        self.completions: queue.SimpleQueue[tuple[Request, str]] = queue.SimpleQueue()
        self.reserved: collections.deque[Request] = collections.deque()
        self.timers: list[tuple[float, int, Request]] = []  # ETA not reached yet
        self.limited: list[tuple[float, int, Request]] = []  # waiting for a rate-limit token
        self.held = 0  # messages received and not settled
        self.running = 0  # jobs submitted to the pool and not done
        self.processed = 0
        self.active: dict[str, Request] = {}  # running now, by task id
        self._seq = itertools.count()
        self._thread = threading.current_thread()
        self._last_maintain = 0.0
        self.last_turn = time.monotonic()  # progress, for the health check
        self.reconnecting = False  # True while the loop waits for the broker (not a wedge)
        self._stop = threading.Event()
        conf = app.conf
        self.rate_limits = RateLimits()
        self.disable_rate_limits = bool(conf.worker_disable_rate_limits)
        self.disable_prefetch = bool(conf.worker_disable_prefetch)
        self.eta_task_limit: int | None = conf.worker_eta_task_limit
        self._qos = prefetch_count  # the bound the transport has now
        #: revoked task ids, checked at receive and before a run (set by the worker).
        self.revoked: RevokedSet | None = None
        #: tasks accepted by the pool, by name (``inspect stats`` ``total``).
        self.totals: collections.Counter[str] = collections.Counter()
        self._totals_lock = threading.Lock()  # pool threads count; += on a Counter races
        #: work other threads (remote control) hand to the loop's thread.
        self.calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        #: result-store writes of skipped messages, off the loop's thread.
        self.store_writes = StoreWrites(self.call_soon)
        self._acks: list[Request] = []  # reported by the pool, not sent yet
        #: ids of early-ack tasks run although the broker may not have got their acks (an
        #: AMQP link lost while confirming them): a redelivered copy is acked, not run.
        self.unsure: set[str] = set()
        #: Slots write early acks only while this is open (closed while reconnecting).
        self._slot_acks = threading.Lock()
        self._slot_acks_open = True

    # -- stopping ---------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to return (warm shutdown); safe from any thread or signal handler."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """True once ``stop()`` was called."""
        return self._stop.is_set()

    # -- the loop ---------------------------------------------------------------------

    def run(self) -> None:
        """Run the loop until ``stop()``: nothing but ``stop()`` ends it.

        A dropped link, or any other broker error that is not about one message (Redis
        ``READONLY`` after a failover, ``LOADING``, ...), reconnects with backoff. Any
        other error of a turn is logged and the loop goes on: a worker that exits leaves
        its messages to the next one, which would meet the same error.
        """
        while not self._stop.is_set():
            try:
                self.turn()
            except TransportError as exc:
                if self._stop.is_set():
                    break
                self._reconnect(exc)
            except Exception:
                logger.exception("a turn of the consumer loop failed; going on")
                self._stop.wait(0.1)  # no busy loop if it keeps failing

    def turn(self) -> None:
        """One pass of the loop."""
        self.last_turn = time.monotonic()
        self.settle_completions(flush=False)
        self._run_calls()
        self._start_due_timers()
        self._start_reserved()
        self._maintain()
        bound = self._update_qos()
        busy = self._busy()
        if busy and len(self.reserved) > self.pool.concurrency:
            # Enough work waits for the busy pool: the next event that matters is a
            # completion, not a message. py-spy on a no-op drain (solo, Redis and AMQP)
            # showed the loop blocked in poll() while the pool sat idle and its acks
            # (which free the prefetch window) waited for poll() to return, then one
            # broker round trip per ack and per claim of one message. Here acks pile up
            # while the reserved work drains and go in one batch before the next poll
            # (or when no completion came for a while: a slow task's late ack waits at
            # most that long); polls take bigger batches.
            if not self._wait_for_completion(0.05, flush=False):
                self._flush_acks()
            return
        self._flush_acks()
        if bound < 0 or (bound and self.held >= bound):
            self._wait_for_completion(0.2)
            return
        if busy and self.reserved:
            timeout = 0.0  # take what already arrived, then wait on the pool below
        else:
            timeout = 0.05 if (self.held or self.timers or self.limited) else 0.5
        messages = self.connection.transport.poll(timeout=timeout)
        for message in messages:
            self.held += 1
            self.on_message(message)
        if not messages and timeout == 0.0:
            self._wait_for_completion(0.05)  # nothing new: the pool's turn (no busy loop)

    def _update_qos(self) -> int:
        """The prefetch bound for this turn (0: none; -1: take nothing now).

        ETA messages waiting in memory raise the bound (up to
        ``worker_eta_task_limit``) so that they never block the queue behind
        them; with ``worker_disable_prefetch`` the bound admits only as many
        messages as there are free slots.
        """
        if self.disable_prefetch:
            free = self.pool.concurrency - self.running - len(self.reserved) - len(self.limited)
            if free <= 0:
                return -1
            bound = self.held + free
        elif self.prefetch_count:
            waiting = len(self.timers)
            if self.eta_task_limit is not None:
                waiting = min(waiting, self.eta_task_limit)
            bound = self.prefetch_count + waiting
        else:
            return 0
        if bound != self._qos:
            self.connection.transport.set_prefetch(bound)
            self._qos = bound
        return bound

    def _maintain(self) -> None:
        transport = self.connection.transport
        now = time.monotonic()
        if now - self._last_maintain >= transport.maintain_interval:
            self._last_maintain = now
            transport.maintain()

    def _wait_for_completion(self, timeout: float, *, flush: bool = True) -> bool:
        """Wait up to ``timeout`` for the pool to report; settle all it reported.

        Returns:
            False when nothing came.
        """
        try:
            item = self.completions.get(timeout=timeout)
        except queue.Empty:
            return False
        # Everything else reported meanwhile goes too, its acks in one batch (the
        # profile showed one broker round trip per ack when settled one at a time).
        self.settle_completions(item, flush=flush)
        return True

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop's thread at its next turn (safe from any thread)."""
        self.calls.put(fn)

    def _run_calls(self) -> None:
        while True:
            try:
                fn = self.calls.get_nowait()
            except queue.Empty:
                return
            try:
                fn()
            except (ConnectionLost, BrokerConnectionError):
                raise
            except Exception:
                logger.exception("a call handed to the consumer loop failed")

    # -- the pool's slots -------------------------------------------------------------

    def _start_reserved(self) -> None:
        starting: list[Request] = []
        late_room, early_room = self._rooms()  # once per turn: prefork counts under a lock
        in_slot = self._acks_in_slot()
        while self.reserved and not self.stopping:
            request = self.reserved[0]
            if self.running >= (early_room if self._acked_here(request, in_slot) else late_room):
                break
            self.reserved.popleft()
            if request.expired():
                self._revoke_expired(request)
                continue
            if self._is_revoked(request):
                self._discard_revoked(request)
                continue
            wait = self._rate_limit_wait(request)
            if wait > 0:
                heapq.heappush(self.limited, (time.monotonic() + wait, next(self._seq), request))
                continue
            self.running += 1
            starting.append(request)
        if starting:
            self._start(starting)

    def _start(self, starting: list[Request]) -> None:
        """Submit them all; an early ack is written before its body starts.

        An early ack promises that the task runs at most once: its ack is written to the
        broker before its body starts (``Transport.ack_early``; the broker's confirmation
        is read later, off the path to the body), so a crash of the worker cannot hand it
        out again. Where the pool and the transport allow it (``_acks_in_slot``), the
        slot that takes the job writes it (``_ack_in_slot``): a job can wait in the pool
        for the next free slot, unacked, as a late-ack one does. Otherwise the loop writes
        them here, one write per batch, for free slots only; if they cannot be written,
        nothing starts: the loop reconnects (``_reconnect`` decides what runs then, and
        what to do with acks written but not confirmed).
        """
        in_slot = self._acks_in_slot()
        early = [r.message for r in starting
                 if self._acked_here(r, in_slot) and not r.message.settled]
        if early:
            try:
                self.connection.transport.ack_early(early)
            except TransportError:
                self.running -= len(starting)
                self.reserved.extendleft(reversed(starting))
                raise
            finally:
                self.held -= sum(m.state is MessageState.ACKED for m in early)
        for request in starting:
            self.active[request.id] = request
            request.job = job = self._job(request)
            if not request.acks_late and not request.message.settled:
                job.before_start = self._ack_in_slot
            self.pool.submit(job)

    def _acks_in_slot(self) -> bool:
        """True when pool slots write early acks (``Pool.acks_in_slot``,
        ``Transport.acks_from_any_thread``)."""
        return self.pool.acks_in_slot and self.connection.transport.acks_from_any_thread

    @staticmethod
    def _acked_here(request: Request, in_slot: bool) -> bool:
        """True for a request whose early ack the loop writes, before it submits the job
        (to a free slot only)."""
        return not request.acks_late and (request.ack_in_loop or not in_slot)

    def _capacity(self) -> int:
        """How many jobs may be in the pool: its slots, plus the ones it can hold
        ready for the next free slot (none with ``worker_disable_prefetch``)."""
        if self.disable_prefetch:
            return self.pool.concurrency
        return self.pool.concurrency + self.pool.queue_ahead

    def _rooms(self) -> tuple[int, int]:
        """How many jobs may be in the pool for a late-ack and for an early-ack request to
        join them. An early-ack job goes only to a free slot that exists
        (``Pool.missing_slots``): acked, then held behind others or for a slot being made,
        it would be lost with the worker."""
        return self._capacity(), self.pool.concurrency - self.pool.missing_slots

    def _busy(self) -> bool:
        """True when the pool has no room for the next reserved request."""
        if self.reserved and self._acked_here(self.reserved[0], self._acks_in_slot()):
            return self.running >= self._rooms()[1]
        return self.running >= self._capacity()

    def _take_back(self) -> list[Request]:
        """The requests the pool holds and no slot started: out of ``running`` again.

        An early-ack job among them was acked already: it goes back to the pool to run
        (a slot was free when it was submitted; it only had not taken it yet).
        """
        requests = []
        for job in self.pool.take_back():
            request: Request = job.request
            if not request.acks_late and request.message.state is MessageState.ACKED:
                self.pool.submit(job)
                continue
            self.running -= 1
            if self.active.get(request.id) is request:
                del self.active[request.id]
            requests.append(request)
        return requests

    def _job(self, request: Request) -> TaskJob:
        task, conf, tm = request.task, self.app.conf, request.tm
        hard = _first(tm.time_limit, task.time_limit, conf.task_time_limit)
        soft = _first(tm.soft_time_limit, task.soft_time_limit, conf.task_soft_time_limit)
        return TaskJob(task=task, context=request.context, store=self._store_results(),
                       on_accepted=self._accept, on_done=self._on_done,
                       time_limit=hard, soft_time_limit=soft, request=request)

    def abort_running(self, reason: str) -> int:
        """Ask every running task to stop (``request.should_abort()``); return how many."""
        running = [r.job for r in list(self.active.values()) if r.job is not None]
        for job in running:
            self.pool.abort(job, reason)
        return len(running)

    # -- shutdown ---------------------------------------------------------------------

    def give_back_reserved(self) -> int:
        """Requeue every message received but not started (shutdown); return how many."""
        pending = self._take_back() + list(self.reserved) \
            + [r for _, _, r in self.timers + self.limited]
        self.reserved.clear()
        self.timers.clear()
        self.limited.clear()
        for request in pending:
            self._settle(request, REQUEUE)
        return len(pending)

    def wait_for_running(self, deadline: float | None, cold: threading.Event) -> bool:
        """Keep settling until every running job (and store write) is done; False if cut
        short."""
        while self.running > 0 or self.store_writes.pending:
            if cold.is_set() or (deadline is not None and time.monotonic() >= deadline):
                self._flush_acks()  # late acks of the tasks that ended
                return False
            self._wait_for_completion(0.1)
            self._run_calls()  # the settles that follow store writes
            try:
                self._maintain()
            except TransportError as exc:
                logger.warning("maintain failed during shutdown: %s", exc)
        self.settle_completions()
        return True

    def info(self) -> dict[str, Any]:
        """Numbers for logs and ``inspect stats``."""
        return {"held": self.held, "running": self.running, "reserved": len(self.reserved),
                "scheduled": len(self.timers), "rate_limited": len(self.limited),
                "processed": self.processed}


def _first(*values: float | None) -> float | None:
    """The first value that is not None (a request's limit overrides the task's)."""
    for value in values:
        if value is not None:
            return float(value)
    return None
