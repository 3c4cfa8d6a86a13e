"""The receive loop: the only code that touches the consuming broker connection.

One loop, in the worker's main thread:

1. settle what the pool reported (acks, rejects) since the last turn,
2. start reserved requests while the pool has free slots,
3. poll the broker for more messages, up to the prefetch bound,
4. every second, ``transport.maintain()`` (heartbeats, claim refresh).

Pool threads never touch the connection: they put ``(request, action)`` on a
thread-safe queue that the loop drains (py-amqp channels are not thread-safe).
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from taskframe import signals, states
from taskframe.errors import (
    ContentDisallowed,
    DecodeError,
    InvalidTaskError,
    NotRegistered,
    TransportError,
)
from taskframe.execution.outcome import Outcome
from taskframe.pools.base import TaskJob
from taskframe.protocol import decode_message
from taskframe.transport import Connection, Message, Queue
from taskframe.transport.base import MessageState
from taskframe.transport.errors import BrokerConnectionError, ConnectionLost
from taskframe.transport.producer import publish_on
from taskframe.worker.ratelimit import RateLimits
from taskframe.worker.request import Request

if TYPE_CHECKING:
    from taskframe.client.app import Taskframe
    from taskframe.control.revoked import RevokedSet
    from taskframe.pools.base import Pool

__all__ = ["Consumer"]

logger = logging.getLogger("taskframe.worker.consumer")

# Messages due within this many seconds wait in memory; later ones go back to a
# broker that can delay them, so the worker never sits on far-future ETAs.
LOCAL_ETA_WINDOW = 2.0

ACK, REJECT, REQUEUE, DONE = "ack", "reject", "requeue", "done"


class Consumer:
    """Receives task messages, hands them to the pool, settles them."""

    def __init__(self, app: Taskframe, connection: Connection, queues: list[Queue], pool: Pool,
                 *, hostname: str, prefetch_count: int) -> None:
        self.app = app
        self.connection = connection
        self.queues = queues
        self.pool = pool
        self.hostname = hostname
        self.prefetch_count = prefetch_count
        self.accept = tuple(app.conf.accept_content)
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
        self._acks: list[Request] = []  # reported by the pool, not sent yet

    # -- setup ------------------------------------------------------------------------

    def start_consuming(self) -> None:
        """Declare the queues and start receiving from them."""
        transport = self.connection.transport
        for q in self.queues:
            transport.declare(q)
        self._qos = self.prefetch_count
        transport.consume(self.queues, prefetch_count=self.prefetch_count)

    def stop(self) -> None:
        """Ask the loop to return (warm shutdown); safe from any thread or signal handler."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """True once ``stop()`` was called."""
        return self._stop.is_set()

    # -- the loop ---------------------------------------------------------------------

    def run(self) -> None:
        """Run the loop until ``stop()``; reconnects when the broker link drops."""
        while not self._stop.is_set():
            try:
                self.turn()
            except (ConnectionLost, BrokerConnectionError) as exc:
                if self._stop.is_set():
                    break
                self._reconnect(exc)

    def turn(self) -> None:
        """One pass of the loop."""
        self.last_turn = time.monotonic()
        self.settle_completions(flush=False)
        self._run_calls()
        self._recheck_queued()
        self._start_due_timers()
        self._start_reserved()
        self._maintain()
        bound = self._update_qos()
        busy = self.running >= self._capacity()
        if busy and len(self.reserved) > self.pool.concurrency:
            # Enough work waits for the busy pool: the next event that matters is a
            # completion, not a message. py-spy on a no-op drain (solo, Redis and AMQP)
            # showed the loop blocked in poll() while the pool sat idle and its acks
            # (which free the prefetch window) waited for poll() to return, then one
            # broker round trip per ack and per claim of one message. Here acks pile up
            # while the reserved work drains and go in one batch before the next poll
            # (or when no completion came for a while: a slow task's early ack waits at
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

    def settle_completions(self, first: tuple[Request, str] | None = None, *,
                           flush: bool = True) -> None:
        """Apply every action the pool reported; acks go to the broker in one batch.

        Args:
            first: an action already taken off the queue, applied with the rest.
            flush: send the acks now; otherwise they wait for ``_flush_acks`` (the
                loop's next poll). A delayed ack never loses a message: at worst a
                crash in between runs it again, as with a late ack.
        """
        acks = self._acks
        if first is not None:
            if first[1] == ACK:
                acks.append(first[0])
            else:
                self._settle(*first)
        while True:
            try:
                request, action = self.completions.get_nowait()
            except queue.Empty:
                break
            if action == ACK:
                acks.append(request)
            else:
                self._settle(request, action)
        if flush:
            self._flush_acks()

    def _flush_acks(self) -> None:
        if self._acks:
            acks, self._acks = self._acks, []
            self._ack_batch(acks)

    def _ack_batch(self, requests: list[Request]) -> None:
        transport = self.connection.transport
        current = [r for r in requests
                   if not r.message.settled and r.message.transport is transport]
        for request in requests:
            if request not in current:
                self._settle(request, ACK)  # stale or settled: handled one by one
        if not current:
            return
        try:
            transport.ack_many([r.message for r in current])
        except ConnectionLost:
            raise
        except TransportError as exc:
            logger.warning("could not ack %d message(s) at once (%s): one by one", len(current),
                           exc)
            for request in current:
                self._settle(request, ACK)
            return
        self.held -= len(current)

    def report(self, request: Request, action: str) -> None:
        """Called by jobs (any thread): settle now on the loop's thread, else queue it.

        An ack reported on the loop's thread (a pool that accepts a job as it is
        submitted, like prefork) joins the next batch instead of costing a round trip.
        """
        if threading.current_thread() is self._thread:
            if action == ACK:
                self._acks.append(request)
            else:
                self._settle(request, action)
        else:
            self.completions.put((request, action))

    def _settle(self, request: Request, action: str) -> None:
        if action == DONE:
            self.running -= 1
            self.processed += 1
            return
        message = request.message
        if message.settled:
            return
        if message.transport is not self.connection.transport:
            # Received on a connection that has since dropped: the broker gives the
            # message back by itself, so settling it here would be wrong or impossible.
            # (``_reconnect`` already took it out of ``held``.)
            logger.info("not settling %r: its connection was lost", request)
            message.state = MessageState.LOST
            return
        try:
            if action == ACK:
                message.ack()
            elif action == REQUEUE:
                message.reject(requeue=True)
            else:
                message.reject(requeue=False)
        except TransportError as exc:
            logger.warning("could not %s %r: %s", action, request, exc)
        self.held -= 1

    # -- receiving --------------------------------------------------------------------

    def on_message(self, message: Message) -> None:
        """Decode, validate and reserve one message (or reject it with one log line)."""
        try:
            tm = decode_message(message, self.accept)
        except ContentDisallowed as exc:
            return self._discard(message, f"content type refused ({exc}); accept_content is "
                                 f"{list(self.accept)}")
        except DecodeError as exc:
            return self._discard(message, f"body cannot be decoded: {exc}")
        except InvalidTaskError as exc:
            return self._discard(message, f"invalid task message: {exc}")
        task = self.app.tasks.get(tm.name)
        if task is None:
            return self._unknown_task(message, tm.name, tm.id)
        acks_late = task.acks_late if task.acks_late is not None else self.app.conf.task_acks_late
        request = Request(message, tm, task, hostname=self.hostname, acks_late=bool(acks_late))
        logger.info("Task %s[%s] received", request.name, request.id)
        signals.task_received.send(sender=self, request=request.context)
        if request.expired():
            return self._revoke_expired(request)
        if self._is_revoked(request):
            return self._discard_revoked(request)
        delay = request.eta_delay()
        if delay > LOCAL_ETA_WINDOW and self._can_defer(message):
            return self._defer(request, delay)
        if delay > 0:
            heapq.heappush(self.timers, (time.monotonic() + delay, next(self._seq), request))
            return None
        self.reserved.append(request)
        self._start_reserved()
        return None

    def _discard(self, message: Message, reason: str) -> None:
        logger.error(
            "Rejected message (delivery_tag=%r, routing_key=%r, content_type=%r, headers=%r): %s",
            message.delivery_tag, message.delivery_info.get("routing_key"),
            message.content_type, {k: message.headers.get(k) for k in ("id", "task")}, reason,
        )
        self._settle_message(message, requeue=False)

    def _settle_message(self, message: Message, *, requeue: bool) -> None:
        try:
            message.reject(requeue=requeue)
        except TransportError as exc:
            logger.warning("could not reject %r: %s", message, exc)
        self.held -= 1

    def _unknown_task(self, message: Message, name: str, task_id: str) -> None:
        logger.error(
            "Received unregistered task of type %r (id %s): rejected. Is the module that "
            "defines it imported by the worker (-A, include, imports)?", name, task_id,
        )
        exc = NotRegistered(name)
        signals.task_unknown.send(sender=self, name=name, id=task_id, message=message, exc=exc)
        if self.app.result_backend_url is not None:
            try:
                self.app.backend.mark_as_failure(task_id, exc)
            except Exception:
                logger.exception("could not store NotRegistered for %s", task_id)
        self._settle_message(message, requeue=False)

    def _revoke_expired(self, request: Request) -> None:
        logger.info("Task %s[%s] expired: not run", request.name, request.id)
        if not request.context.ignore_result and self.app.result_backend_url is not None:
            self.app.backend.mark_as_revoked(request.id, "expired")
        if self.app.result_backend_url is not None:  # a chord header part still counts
            from taskframe.canvas.chord_completion import on_revoked

            on_revoked(request.task, request.context, "expired")
        signals.task_revoked.send(sender=request.task, request=request.context,
                                  terminated=False, signum=None, expired=True)
        self._settle(request, ACK)

    def _is_revoked(self, request: Request) -> bool:
        revoked = self.revoked
        if revoked is None:
            return False
        return request.id in revoked or revoked.matches_stamps(request.context.stamps)

    def _discard_revoked(self, request: Request) -> None:
        """Skip a revoked task: store REVOKED (never over a result), signal, ack."""
        logger.info("Discarding revoked task: %s[%s]", request.name, request.id)
        if self.app.result_backend_url is not None:
            from taskframe.canvas.chord_completion import on_revoked

            try:
                if not request.context.ignore_result:
                    self.app.backend.mark_as_revoked(request.id, "revoked")
                on_revoked(request.task, request.context, "revoked")  # a chord part counts
            except Exception as exc:
                logger.warning("could not store REVOKED for %s: %r", request.id, exc)
        signals.task_revoked.send(sender=request.task, request=request.context,
                                  terminated=False, signum=None, expired=False)
        self._settle(request, ACK)

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

    def _can_defer(self, message: Message) -> bool:
        exchange, routing_key = _origin(message)
        return bool(routing_key) and self.connection.transport.can_delay(exchange, routing_key)

    def _defer(self, request: Request, delay: float) -> None:
        """Give a far-future ETA message back to the broker, delayed; then ack the original."""
        exchange, routing_key = _origin(request.message)
        publish_on(self.connection.transport, request.message.to_envelope(),
                   exchange=exchange, routing_key=routing_key, delay=delay)
        self._settle(request, ACK)

    # -- running ----------------------------------------------------------------------

    def _start_due_timers(self) -> None:
        now = time.monotonic()
        for heap in (self.timers, self.limited):
            while heap and heap[0][0] <= now:
                _, _, request = heapq.heappop(heap)
                self.reserved.append(request)

    def _start_reserved(self) -> None:
        capacity = self._capacity()
        while self.reserved and self.running < capacity and not self.stopping:
            request = self.reserved.popleft()
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
            self.active[request.id] = request
            request.job = self._job(request)
            self.pool.submit(request.job)

    def _capacity(self) -> int:
        """How many jobs may be in the pool: its slots, plus the ones it can hold
        ready for the next free slot (none with ``worker_disable_prefetch``)."""
        if self.disable_prefetch:
            return self.pool.concurrency
        return self.pool.concurrency + self.pool.queue_ahead

    def _recheck_queued(self) -> None:
        """A job revoked while it waited in the pool for a slot (``queue_ahead``) is taken
        back with the others waiting there, so that it is checked again before it runs."""
        if self.revoked is None or not self.pool.queue_ahead:
            return
        # A copy: pool threads delete from ``active`` as jobs end (``_on_done``).
        if any(not r.started and self._is_revoked(r) for r in list(self.active.values())):
            self.reserved.extendleft(reversed(self._take_back()))

    def _take_back(self) -> list[Request]:
        """The requests the pool holds and no slot started: out of ``running`` again."""
        requests = []
        for job in self.pool.take_back():
            request: Request = job.request
            self.running -= 1
            if self.active.get(request.id) is request:
                del self.active[request.id]
            requests.append(request)
        return requests

    def _rate_limit_wait(self, request: Request) -> float:
        if self.disable_rate_limits:
            return 0.0
        task = request.task
        default = task.rate_limit if task.rate_limit is not None \
            else self.app.conf.task_default_rate_limit
        return self.rate_limits.delay(task.name, default)

    def set_rate_limit(self, task_name: str, limit: str | float | None) -> None:
        """Change a task's rate limit now (control ``rate_limit``); None or 0 removes it.

        Runs of that task waiting for a token are looked at again under the new limit.
        """
        self.rate_limits.set(task_name, limit)
        waiting = [entry for entry in self.limited if entry[2].task.name == task_name]
        if waiting:
            self.limited = [entry for entry in self.limited if entry[2].task.name != task_name]
            heapq.heapify(self.limited)
            self.reserved.extend(request for _, _, request in sorted(waiting))

    def _job(self, request: Request) -> TaskJob:
        task, conf, tm = request.task, self.app.conf, request.tm
        hard = _first(tm.time_limit, task.time_limit, conf.task_time_limit)
        soft = _first(tm.soft_time_limit, task.soft_time_limit, conf.task_soft_time_limit)
        return TaskJob(task=task, context=request.context, store=self._store_results(),
                       on_accepted=self._on_accepted, on_done=self._on_done,
                       time_limit=hard, soft_time_limit=soft, request=request)

    def _on_accepted(self, job: TaskJob) -> None:
        """A pool slot took the job (any thread): early acks go now."""
        request: Request = job.request
        request.started = True
        with self._totals_lock:
            self.totals[request.task.name] += 1
        if not request.acks_late:
            self.report(request, ACK)

    def total_counts(self) -> dict[str, int]:
        """Tasks accepted so far, by name (a copy; safe from any thread)."""
        with self._totals_lock:
            return dict(self.totals)

    def _on_done(self, job: TaskJob, outcome: Outcome) -> None:
        """The job ended (any thread): settle late acks, free the slot."""
        request: Request = job.request
        if outcome.state == states.REVOKED and self._store_results():  # terminated
            from taskframe.canvas.chord_completion import on_revoked

            on_revoked(job.task, job.context, "terminated")
        try:
            if request.acks_late:
                self.report(request, self._late_action(request, outcome))
            elif outcome.state == states.REJECTED and outcome.requeue:
                logger.warning("%r asked to requeue but was acked early", request)
        finally:
            if self.active.get(request.id) is request:
                del self.active[request.id]
            self.report(request, DONE)

    def abort_running(self, reason: str) -> int:
        """Ask every running task to stop (``request.should_abort()``); return how many."""
        running = [r.job for r in list(self.active.values()) if r.job is not None]
        for job in running:
            self.pool.abort(job, reason)
        return len(running)

    def _store_results(self) -> bool:
        return self.app.result_backend_url is not None

    def _late_action(self, request: Request, outcome: Outcome) -> str:
        if outcome.state == states.REJECTED:
            return REQUEUE if outcome.requeue else REJECT
        if outcome.state == states.FAILURE:
            task = request.task
            ack = task.acks_on_failure_or_timeout
            if ack is None:
                ack = self.app.conf.task_acks_on_failure_or_timeout
            return ACK if ack else REJECT
        return ACK

    # -- reconnection and shutdown ----------------------------------------------------

    def _reconnect(self, exc: Exception) -> None:
        logger.error("Connection to broker lost: %s. Reconnecting...", exc)
        # Messages received on the dropped connection come back from the broker: forget
        # them (running tasks still finish; their late acks are skipped).
        pending = self._take_back() + [r for _, _, r in self.timers + self.limited] \
            + list(self.reserved) + list(self.active.values())
        for request in pending:
            if not request.message.settled:
                request.message.state = MessageState.LOST
        self.held = 0
        self.timers.clear()
        self.limited.clear()
        self.reserved.clear()
        with contextlib.suppress(TransportError):
            self.connection.close()
        self.connection.ensure_connection(
            max_retries=self.app.conf.broker_connection_max_retries,
            on_error=lambda err, wait: logger.warning(
                "Broker unreachable: %s. Trying again in %.1f s", err, wait),
        )
        self.start_consuming()
        logger.info("Reconnected to %s", self.connection.safe_url())

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
        """Keep settling until every running job is done; False if cut short."""
        while self.running > 0:
            if cold.is_set() or (deadline is not None and time.monotonic() >= deadline):
                self._flush_acks()  # the tasks that started were acked early
                return False
            self._wait_for_completion(0.1)
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


def _origin(message: Message) -> tuple[str, str]:
    """Where to send a message again so it reaches the queue it came from.

    The queue itself through the default exchange when the transport says which
    queue it was; otherwise the exchange and routing key it was published with.
    """
    info = message.delivery_info
    queue = info.get("queue")
    if queue:
        return "", str(queue)
    return str(info.get("exchange") or ""), str(info.get("routing_key") or "")


def _first(*values: float | None) -> float | None:
    """The first value that is not None (a request's limit overrides the task's)."""
    for value in values:
        if value is not None:
            return float(value)
    return None
