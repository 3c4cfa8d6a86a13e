"""Exchanges and queues, as plain immutable values.

A ``Queue`` names its exchange and the routing key that binds them. Celery's
default topology is one direct exchange per queue, named like the queue, bound
with the queue name as routing key; ``Queue("celery")`` builds exactly that.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["DEAD_LETTER_SUFFIX", "Exchange", "Queue", "QueueType", "dead_letter_queue"]

#: The dead-letter queue of queue ``Q`` is ``Q`` + this suffix (every transport).
DEAD_LETTER_SUFFIX = ".dead"

QueueType = Literal["classic", "quorum"]
ExchangeType = Literal["direct", "topic", "fanout", "headers"]


@dataclass(frozen=True)
class Exchange:
    """A named exchange. ``Exchange("")`` is the AMQP default exchange."""

    name: str
    type: ExchangeType = "direct"
    durable: bool = True
    auto_delete: bool = False
    arguments: Mapping[str, Any] = field(default_factory=dict)

    def __hash__(self) -> int:
        return hash((self.name, self.type))


@dataclass(frozen=True)
class Queue:
    """A named queue bound to ``exchange`` with ``routing_key``.

    Args:
        name: the queue name.
        exchange: defaults to a direct exchange named like the queue.
        routing_key: defaults to the queue name.
        queue_type: ``"classic"`` or ``"quorum"`` (RabbitMQ).
        max_priority: enables priorities 0..max_priority where the broker needs it.
        arguments: extra broker arguments (``x-delivery-limit``, ...).
    """

    name: str
    exchange: Exchange | None = None
    routing_key: str | None = None
    durable: bool = True
    exclusive: bool = False
    auto_delete: bool = False
    queue_type: QueueType = "classic"
    max_priority: int | None = None
    arguments: Mapping[str, Any] = field(default_factory=dict)

    def __hash__(self) -> int:
        return hash(self.name)

    @property
    def bound_exchange(self) -> Exchange:
        """The exchange this queue is bound to (Celery's default when none was given)."""
        return self.exchange if self.exchange is not None else Exchange(self.name)

    @property
    def bound_routing_key(self) -> str:
        """The routing key that binds the queue (the queue name when none was given)."""
        return self.routing_key if self.routing_key is not None else self.name

    def publish_target(self) -> tuple[str, str]:
        """Where a producer sends a message meant for this queue: ``(exchange, routing_key)``.

        Celery's rule: a queue on a direct exchange is reached through the default
        exchange ``""`` with the queue name as routing key; other exchange types
        get their exchange and the queue's routing key.
        """
        exchange = self.bound_exchange
        if exchange.type == "direct":
            return "", self.name
        return exchange.name, self.bound_routing_key


def dead_letter_queue(name: str) -> str:
    """The queue where messages of queue ``name`` over their delivery limit are kept."""
    return name + DEAD_LETTER_SUFFIX
