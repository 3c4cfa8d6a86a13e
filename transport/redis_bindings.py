"""kombu's exchange emulation on Redis, for one transport: bindings, routing, expiring queues.

kombu keeps no exchanges on the server, only a binding table per exchange: the set
``_kombu.binding.<exchange>`` of ``routing_key SEP pattern SEP queue`` members, plus,
since kombu 5.7, ``_kombu.binding_permanent.<exchange>`` for queues without
``x-expires`` and the ``_kombu.binding_deadlines`` refresh for queues with it.
``Bindings`` writes a declared queue's member (and rewrites an expiring queue's every
ten minutes so it does not lapse), remembers the exchange types declared here (kombu
stores none; a ``fanout`` exchange is published on a channel instead), routes a publish
through the table and keeps an expiring queue's lists alive while they are used.

Its methods take the redis-py client (and the script they run) from the transport, and
translate redis-py's errors themselves, but for ``touch``, which only queues commands on
the caller's pipeline.
"""

from __future__ import annotations

import redis
import redis.client
from redis.commands.core import Script

from . import redis_upkeep as upkeep
from .entities import Exchange, Queue
from .redis_layout import KeyLayout, queue_expires, topic_pattern, translate_errors

__all__ = ["Bindings"]

# kombu 5.7: a binding table of an expiring queue lives max(2 x x-expires, 1 h).
_MIN_BINDING_TTL_MS = 3_600_000
# How often the bindings of expiring queues are written again.
_REFRESH_EVERY = 600.0


class Bindings:
    """The exchanges, bindings and ``x-expires`` of the queues one transport declared."""

    def __init__(self, layout: KeyLayout) -> None:
        #: Exchange name -> type, for the exchanges declared on this transport.
        self.exchange_types: dict[str, str] = {}
        #: Queue name -> ``x-expires`` (ms), for the declared queues that have one.
        self.expires: dict[str, int] = {}
        self._bound: dict[str, tuple[str, str, str]] = {}  # queue -> (exchange, rk, pattern)
        self._layout = layout
        self._refreshed_at = 0.0

    def declare(self, client: redis.Redis, script: Script, queue: Queue) -> None:
        """Note the queue's ``x-expires`` and exchange; write its binding-table member."""
        exchange = queue.bound_exchange
        expires = queue_expires(queue.arguments)
        if expires is not None:
            self.expires[queue.name] = expires
        else:
            self.expires.pop(queue.name, None)
        if not exchange.name:
            return
        self.declare_exchange(exchange)
        routing_key = queue.bound_routing_key
        pattern = topic_pattern(routing_key) if exchange.type == "topic" else ""
        self._bound[queue.name] = (exchange.name, routing_key, pattern)
        self._write(client, script, exchange.name, routing_key, pattern, queue.name)

    def declare_exchange(self, exchange: Exchange) -> None:
        """Note the exchange's type (nothing is written: kombu stores none)."""
        if exchange.name:
            self.exchange_types[exchange.name] = exchange.type

    def _write(self, client: redis.Redis, script: Script, exchange: str, routing_key: str,
               pattern: str, queue: str) -> None:
        layout = self._layout
        member = layout.member(routing_key, pattern, queue)
        with translate_errors(f"binding {queue!r} to {exchange!r}"):
            if queue in self.expires:
                ttl = max(self.expires[queue] * 2, _MIN_BINDING_TTL_MS)
                script(
                    keys=[layout.binding_key(exchange), layout.binding_deadlines_key],
                    args=[member, exchange, ttl], client=client,
                )
            else:
                pipe = client.pipeline()
                pipe.sadd(layout.binding_key(exchange), member)
                pipe.sadd(layout.binding_permanent_key(exchange), member)
                pipe.execute()

    def refresh(self, client: redis.Redis, script: Script, now: float) -> None:
        """Write the bindings of expiring queues again, every ten minutes at most."""
        if not self.expires or now - self._refreshed_at < _REFRESH_EVERY:
            return
        self._refreshed_at = now
        for queue, (exchange, routing_key, pattern) in self._bound.items():
            if queue in self.expires:
                self._write(client, script, exchange, routing_key, pattern, queue)

    def route(self, client: redis.Redis, exchange: str, routing_key: str) -> list[str]:
        """The queues bound to ``exchange`` that ``routing_key`` reaches (kombu's lookup)."""
        with translate_errors(f"reading the bindings of {exchange!r}"):
            return upkeep.route(client, self._layout, self.exchange_types.get(exchange),
                                exchange, routing_key)

    def touch(self, pipe: redis.client.Pipeline, queue: str) -> None:
        """Start the ``x-expires`` countdown of ``queue``'s lists over (in ``pipe``)."""
        expires = self.expires.get(queue)
        if expires is not None:
            for key in self._layout.list_keys(queue):
                pipe.pexpire(key, expires)
