"""The in-process transport: a broker that lives in this process's memory.

Features: default-exchange delivery, direct/topic/fanout exchanges with
bindings, priorities (higher first, then publish order), delayed messages
(``supports_delay``), a prefetch bound, requeue on ``reject(requeue=True)``,
on ``close()`` and when a transport is garbage-collected while holding messages.
Failed deliveries: only ``requeue_failed`` counts (a holder here cannot die
without the broker); ``dead_letter`` moves a message to ``<queue>.dead``.
Thread-safe: transports in different threads share one broker.

URL: ``memory://`` or ``memory://NAME``. Every transport whose URL has the same
NAME (host part) in one process shares one broker; different names are
isolated brokers (handy in tests). Nothing survives the process.

Options: ``max_batch`` (default 100): most messages one ``poll`` returns when
there is no prefetch bound.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
import uuid
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .base import Envelope, Message, Transport
from .entities import Exchange, Queue, dead_letter_queue
from .errors import BrokerConnectionError, MessageStateError
from .routing import Binding, check_exchange_type, route
from .url import parse_url

__all__ = ["MemoryTransport"]

_DEFAULT_MAX_BATCH = 100
# While the prefetch bound is reached, poll() waits this long at most so the
# caller's loop can settle messages instead of blocking for its whole timeout.
_FULL_WAIT = 0.05


@dataclass
class _Stored:
    envelope: Envelope
    exchange: str
    routing_key: str
    queue: str
    priority: int
    seq: int
    delivery_count: int = 0
    failed: int = 0  # deliveries given back with requeue_failed


@dataclass
class _QueueState:
    ready: list[tuple[int, int, _Stored]] = field(default_factory=list)
    delayed: list[tuple[float, int, _Stored]] = field(default_factory=list)

    def promote(self, now: float) -> None:
        while self.delayed and self.delayed[0][0] <= now:
            _due, _seq, stored = heapq.heappop(self.delayed)
            self.push(stored)

    def push(self, stored: _Stored) -> None:
        # The original sequence number puts a requeued message back where it was.
        heapq.heappush(self.ready, (-stored.priority, stored.seq, stored))


class _Broker:
    """The shared state behind every transport of one ``memory://NAME``."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.queues: dict[str, _QueueState] = {}
        self.bindings: dict[str, list[Binding]] = {}
        self.held: dict[str, dict[int, _Stored]] = {}
        self._seq = itertools.count(1)

    def queue(self, name: str) -> _QueueState:
        state = self.queues.get(name)
        if state is None:
            state = self.queues[name] = _QueueState()
        return state

    def bind(self, binding: Binding) -> None:
        with self.cond:
            self.queue(binding.queue)
            existing = self.bindings.setdefault(binding.exchange, [])
            if binding not in existing:
                existing.append(binding)

    def deliver(self, envelope: Envelope, exchange: str, routing_key: str, delay: float) -> None:
        priority = int(envelope.properties.get("priority") or 0)
        with self.cond:
            if exchange:
                targets = route(self.bindings.get(exchange, ()), routing_key)
            else:
                targets = [routing_key]
            due = time.monotonic() + delay
            for name in targets:
                copy = Envelope(
                    body=envelope.body,
                    content_type=envelope.content_type,
                    content_encoding=envelope.content_encoding,
                    headers=dict(envelope.headers),
                    properties=dict(envelope.properties),
                )
                seq = next(self._seq)
                stored = _Stored(copy, exchange, routing_key, name, priority, seq)
                if delay > 0:
                    heapq.heappush(self.queue(name).delayed, (due, seq, stored))
                else:
                    self.queue(name).push(stored)
            self.cond.notify_all()

    def take(self, owner: str, queues: Sequence[str], limit: int) -> list[tuple[int, _Stored]]:
        """Move up to ``limit`` ready messages from ``queues`` to ``owner``'s held set."""
        taken: list[tuple[int, _Stored]] = []
        now = time.monotonic()
        held = self.held.setdefault(owner, {})
        states = [self.queue(name) for name in queues]
        for state in states:
            state.promote(now)
        while len(taken) < limit:
            candidates = [state for state in states if state.ready]
            if not candidates:
                break
            # Highest priority across the consumed queues, then oldest.
            best = min(candidates, key=lambda state: state.ready[0][:2])
            stored = heapq.heappop(best.ready)[2]
            stored.delivery_count += 1
            tag = next(self._seq)
            held[tag] = stored
            taken.append((tag, stored))
        return taken

    def next_due(self, queues: Sequence[str]) -> float | None:
        dues = [self.queues[name].delayed[0][0] for name in queues if self._has_delayed(name)]
        return min(dues) if dues else None

    def _has_delayed(self, name: str) -> bool:
        state = self.queues.get(name)
        return state is not None and bool(state.delayed)

    def settle(self, owner: str, tag: int, requeue: bool, *, failed: bool = False,
               dead: bool = False) -> None:
        with self.cond:
            stored = self.held.get(owner, {}).pop(tag, None)
            if stored is None:
                raise MessageStateError(f"delivery tag {tag} is not held by this transport")
            if dead:
                stored.queue, stored.failed = dead_letter_queue(stored.queue), 0
                self.queue(stored.queue).push(stored)
            elif requeue:
                stored.failed += int(failed)
                self.queue(stored.queue).push(stored)
                self.cond.notify_all()

    def release(self, owner: str) -> None:
        """Give every message held by ``owner`` back to its queue."""
        with self.cond:
            for stored in self.held.pop(owner, {}).values():
                self.queue(stored.queue).push(stored)
            self.cond.notify_all()


_BROKERS: dict[str, _Broker] = {}
_BROKERS_LOCK = threading.Lock()


def _broker_for(name: str) -> _Broker:
    with _BROKERS_LOCK:
        broker = _BROKERS.get(name)
        if broker is None:
            broker = _BROKERS[name] = _Broker()
        return broker


class MemoryTransport(Transport):
    """A transport whose broker is a data structure in this process (see the module docstring)."""

    schemes: ClassVar[tuple[str, ...]] = ("memory",)
    supports_delay: ClassVar[bool] = True
    supports_fanout: ClassVar[bool] = True
    acks_from_any_thread = True  # the broker's condition guards every settle

    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(url, options)
        self._name = parse_url(url).host or ""
        self._max_batch = int(self.options.get("max_batch", _DEFAULT_MAX_BATCH))
        self._broker: _Broker | None = None
        self._owner = ""
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._consumed: dict[str, Queue] = {}
        self._prefetch = 0

    # -- connection -------------------------------------------------------------------

    def connect(self) -> None:
        if self._broker is not None:
            return
        broker = _broker_for(self._name)
        self._owner = uuid.uuid4().hex
        # Held messages live in the broker under our owner id, so a transport that is
        # dropped without close() still gives them back when it is collected.
        self._finalizer = weakref.finalize(self, broker.release, self._owner)
        self._broker = broker

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
        self._finalizer = None
        self._broker = None

    @property
    def connected(self) -> bool:
        return self._broker is not None

    def _require(self) -> _Broker:
        if self._broker is None:
            raise BrokerConnectionError(f"{self!r} is not connected")
        return self._broker

    # -- topology -------------------------------------------------------------------------

    def declare(self, queue: Queue) -> None:
        broker = self._require()
        exchange = queue.bound_exchange
        if not exchange.name:
            with broker.cond:
                broker.queue(queue.name)
            return
        check_exchange_type(exchange.type)
        broker.bind(Binding(exchange.name, exchange.type, queue.bound_routing_key, queue.name))

    def declare_exchange(self, exchange: Exchange) -> None:
        self._require()
        if exchange.name:
            check_exchange_type(exchange.type)

    # -- publishing -------------------------------------------------------------------------

    def publish(
        self,
        envelope: Envelope,
        *,
        exchange: str,
        routing_key: str,
        delay: float | None = None,
    ) -> None:
        self._require().deliver(envelope, exchange, routing_key, max(0.0, delay or 0.0))

    # -- consuming ----------------------------------------------------------------------------

    def consume(self, queues: Sequence[Queue], *, prefetch_count: int = 0) -> None:
        for queue in queues:
            self.declare(queue)
            self._consumed[queue.name] = queue
        self._prefetch = prefetch_count

    def cancel(self, queue_name: str) -> None:
        self._consumed.pop(queue_name, None)

    def set_prefetch(self, prefetch_count: int) -> None:
        self._prefetch = prefetch_count

    def poll(self, timeout: float | None = None) -> list[Message]:
        broker = self._require()
        deadline = None if timeout is None else time.monotonic() + timeout
        with broker.cond:
            while True:
                now = time.monotonic()
                room = self._room(broker)
                if room > 0 and self._consumed:
                    taken = broker.take(self._owner, list(self._consumed), room)
                    if taken:
                        return [self._to_message(tag, stored) for tag, stored in taken]
                if deadline is not None and now >= deadline:
                    return []
                wait = None if deadline is None else deadline - now
                idle = room <= 0 or not self._consumed
                if idle:
                    wait = _FULL_WAIT if wait is None else min(wait, _FULL_WAIT)
                due = broker.next_due(list(self._consumed))
                if due is not None:
                    wait = max(0.0, due - now) if wait is None else max(0.0, min(wait, due - now))
                broker.cond.wait(wait)
                if idle:
                    return []

    def _room(self, broker: _Broker) -> int:
        held = len(broker.held.get(self._owner, ()))
        return self._max_batch if self._prefetch <= 0 else self._prefetch - held

    def _to_message(self, tag: int, stored: _Stored) -> Message:
        envelope = stored.envelope
        return Message(
            self,
            body=envelope.body,
            delivery_tag=tag,
            content_type=envelope.content_type,
            content_encoding=envelope.content_encoding,
            headers=envelope.headers,
            properties=envelope.properties,
            delivery_info={
                "exchange": stored.exchange,
                "routing_key": stored.routing_key,
                "priority": stored.priority,
                "redelivered": stored.delivery_count > 1,
                "queue": stored.queue,
                "delivery_count": stored.failed + 1,
            },
        )

    def ack(self, message: Message) -> None:
        self._require().settle(self._owner, message.delivery_tag, requeue=False)

    def reject(self, message: Message, *, requeue: bool) -> None:
        self._require().settle(self._owner, message.delivery_tag, requeue=requeue)

    def requeue_failed(self, message: Message) -> None:
        self._require().settle(self._owner, message.delivery_tag, requeue=True, failed=True)

    def dead_letter(self, message: Message) -> str | None:
        self._require().settle(self._owner, message.delivery_tag, requeue=False, dead=True)
        return dead_letter_queue(str(message.delivery_info.get("queue")))

    # -- administration ---------------------------------------------------------------------

    def purge(self, queue_name: str) -> int:
        broker = self._require()
        with broker.cond:
            state = broker.queue(queue_name)
            state.promote(time.monotonic())
            count = len(state.ready)
            state.ready.clear()
            return count

    def queue_size(self, queue_name: str) -> int:
        broker = self._require()
        with broker.cond:
            state = broker.queues.get(queue_name)
            if state is None:
                return 0
            state.promote(time.monotonic())
            return len(state.ready)
