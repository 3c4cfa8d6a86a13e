"""What one RabbitMQ connection declared, and where a delayed message can wait in the broker.

``Topology`` declares exchanges and queues once per connection (the transport makes a
new one on each connect): queue arguments for quorum queues and priorities (and the
delivery limit's, ``amqp_failures``), the binding to the queue's exchange. It decides
which destinations are delayed in the broker (the ``delayed_delivery`` option, see
``taskframe.transport.amqp``) and declares what they need of the delay ladder
(``amqp_delayed``): the levels once, then the final-hop bindings of each delayable
queue. Commands go on the link's publishing channel, inside ``Link.translate``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from . import amqp_delayed as ndd
from . import amqp_failures as failures
from .amqp_link import Link
from .entities import Exchange, Queue
from .errors import PublishError
from .routing import topic_matches

__all__ = ["Topology"]

logger = logging.getLogger("taskframe.transport.amqp")

# Queue arguments RabbitMQ reads.
QUEUE_TYPE_ARG = "x-queue-type"
MAX_PRIORITY_ARG = "x-max-priority"


class Topology:
    """The queues, exchanges and delayed-delivery bindings declared on one connection.

    Args:
        link: the connection they are declared on.
        delay_mode: the ``delayed_delivery`` option: ``"auto"``, True or False.
        level_queue_type: the type of the ladder's level queues.
        delivery_limit: the ``delivery_limit`` option (quorum queues' arguments).
    """

    def __init__(self, link: Link, delay_mode: str | bool, level_queue_type: str,
                 delivery_limit: int | None = None) -> None:
        #: Queues declared on this connection, by name.
        self.queues: dict[str, Queue] = {}
        #: Where RabbitMQ dead-letters the messages of each declared queue that has a
        #: dead-letter exchange (``amqp_failures.dead_letter_route``).
        self.dead_letter_routes: dict[str, str] = {}
        self._delivery_limit = delivery_limit
        #: Exchanges declared on this connection.
        self.exchanges: set[str] = set()
        self._link = link
        self._delay_mode = delay_mode
        self._level_queue_type = level_queue_type
        self._ladder_ready = False
        self._delay_bound: set[tuple[str, str, str, str]] = set()

    # -- declarations -----------------------------------------------------------------

    def declare(self, queue: Queue) -> None:
        """Declare ``queue`` (and its exchange, and binding) unless it was, as it is."""
        if self.queues.get(queue.name) == queue:
            return
        exchange = queue.bound_exchange
        if exchange.name:
            with self._link.translate(f"declaring queue {queue.name!r}"):
                self._declare_exchange(exchange)
        arguments = _queue_arguments(queue)
        extra = failures.limit_arguments(queue, self._delivery_limit)
        if failures.declare_queue(self._link, queue, arguments, extra):
            arguments.update(extra)
        route = failures.dead_letter_route(queue.name, arguments)
        if route is not None:
            self.dead_letter_routes[queue.name] = route
        if exchange.name:
            with self._link.translate(f"declaring queue {queue.name!r}"):
                self._link.pub.queue_bind(queue=queue.name, exchange=exchange.name,
                                          routing_key=queue.bound_routing_key)
        self.queues[queue.name] = queue
        if self.delays(queue):
            self._bind_delayed(ndd.destination_bindings(queue))

    def declare_exchange(self, exchange: Exchange) -> None:
        """Declare ``exchange`` unless it was (the default exchange never is)."""
        if exchange.name and exchange.name not in self.exchanges:
            with self._link.translate(f"declaring exchange {exchange.name!r}"):
                self._declare_exchange(exchange)

    def _declare_exchange(self, exchange: Exchange) -> None:
        if exchange.name in self.exchanges:
            return
        self._link.pub.exchange_declare(
            exchange=exchange.name, type=exchange.type, durable=exchange.durable,
            auto_delete=exchange.auto_delete, arguments=dict(exchange.arguments),
        )
        self.exchanges.add(exchange.name)

    # -- native delayed delivery ------------------------------------------------------

    def delays(self, queue: Queue) -> bool:
        """Whether delayed messages for ``queue`` wait in the broker."""
        if self._delay_mode == "auto":
            return queue.queue_type == "quorum"
        return bool(self._delay_mode)

    def delays_all(self) -> bool:
        """Whether every queue declared here is delayed in the broker (``supports_delay``)."""
        if self._delay_mode is False:
            return False
        if self._delay_mode is True:
            return True
        return bool(self.queues) and all(self.delays(q) for q in self.queues.values())

    def can_delay(self, exchange: str, routing_key: str) -> bool:
        """Whether a delayed message to this destination waits in the broker."""
        if self._delay_mode is False:
            return False
        if ndd.is_delay_exchange(exchange):
            return True
        if not exchange:
            queue = self.queues.get(routing_key)
            return self._delay_mode is True or (queue is not None and self.delays(queue))
        # Only through bindings we know: a delayed message nobody is bound for would be
        # dropped at the ladder's end, where no publisher hears of it.
        return any(self.delays(q) for q in self._queues_on(exchange, routing_key))

    def _queues_on(self, exchange: str, routing_key: str | None = None) -> list[Queue]:
        """Declared queues bound to ``exchange`` (that ``routing_key`` reaches, if given)."""
        queues = [q for q in self.queues.values() if q.bound_exchange.name == exchange]
        if routing_key is None:
            return queues
        return [q for q in queues if _reaches(q, routing_key)]

    def declare_ladder(self) -> None:
        """Declare the delay ladder's levels, once per connection."""
        if self._ladder_ready:
            return
        with self._link.translate("declaring the delayed-delivery topology"):
            ndd.declare_ladder(self._link.pub, self._level_queue_type)
        self._ladder_ready = True

    def _bind_delayed(self, bindings: Sequence[tuple[str, str, str, str]]) -> None:
        self.declare_ladder()
        pub = self._link.pub
        with self._link.translate("binding to the delayed-delivery exchange"):
            for binding in bindings:
                if binding in self._delay_bound:
                    continue
                kind, destination, source, key = binding
                if kind == "exchange":
                    pub.exchange_bind(destination=destination, source=source, routing_key=key)
                else:
                    pub.queue_bind(queue=destination, exchange=source, routing_key=key)
                self._delay_bound.add(binding)

    def delayed_target(self, exchange: str, routing_key: str,
                       delay: float) -> tuple[str, str] | None:
        """Where a delayed message goes: the ladder's first exchange and key, or None.

        Raises:
            PublishError: ``delay`` is longer than the ladder's longest.
        """
        if not self.can_delay(exchange, routing_key):
            logger.debug("%s: no broker-side delay for exchange=%r routing_key=%r: "
                         "published now, the worker holds it",
                         self._link.owner, exchange, routing_key)
            return None
        seconds = int(delay)
        if seconds > ndd.MAX_DELAY:
            raise PublishError(
                f"cannot delay a message by {delay:.0f} s: RabbitMQ's delayed delivery "
                f"waits at most {ndd.MAX_DELAY} s (2**28 - 1, about 8.5 years)"
            )
        if ndd.is_delay_exchange(exchange):
            self.declare_ladder()
        elif not exchange:
            self._bind_delayed([ndd.direct_binding(routing_key)])
        else:
            # Every queue we know on the exchange, classic ones too, so none misses it.
            for queue in self._queues_on(exchange):
                self._bind_delayed(ndd.destination_bindings(queue))
        return ndd.FIRST_EXCHANGE, ndd.delayed_routing_key(seconds, routing_key)


def _queue_arguments(queue: Queue) -> dict[str, Any]:
    arguments = dict(queue.arguments)
    if queue.queue_type == "quorum":
        arguments[QUEUE_TYPE_ARG] = "quorum"
        if queue.max_priority is not None:
            logger.warning("queue %r: quorum queues have no x-max-priority; ignored",
                           queue.name)
    elif queue.max_priority is not None:
        arguments[MAX_PRIORITY_ARG] = int(queue.max_priority)
    return arguments


def _reaches(queue: Queue, routing_key: str) -> bool:
    """Whether a message with ``routing_key`` on the queue's exchange reaches ``queue``."""
    kind = queue.bound_exchange.type
    if kind == "fanout":
        return True
    if kind == "topic":
        return topic_matches(queue.bound_routing_key, routing_key)
    return kind == "direct" and queue.bound_routing_key == routing_key
