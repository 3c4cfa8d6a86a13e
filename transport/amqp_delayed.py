"""Native delayed delivery on RabbitMQ, with the topology Celery 5.5+ uses.

A delayed message travels down a ladder of 28 levels (27 to 0). Level ``L`` is
a topic exchange ``celery_delayed_L`` and a queue of the same name whose
messages expire after ``2**L`` seconds and are then dead-lettered to the next
level's exchange (level 0 dead-letters to ``celery_delayed_delivery``). The
routing key spells the delay in 28 binary digits, most significant first, one
per dot-separated word, followed by the message's own routing key::

    5 s to "celery"  ->  "0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.1.0.1.celery"

Queue ``L`` takes the message when its digit is 1 (it waits there ``2**L``
seconds); exchange ``L`` forwards it to exchange ``L-1`` when the digit is 0.
The total wait is the sum of the levels whose digit is set; the longest delay
is ``2**28 - 1`` seconds (about 8.5 years). The final topic exchange
``celery_delayed_delivery`` hands the message to its destination:

* a queue on a topic, fanout or headers exchange is reached as Celery reaches it:
  the destination exchange is bound to ``celery_delayed_delivery`` with
  ``#.<binding key>`` and the queue to its exchange with the same key, so a
  Celery worker and a taskframe worker declare the same bindings;
* a queue on a direct exchange (Celery skips those, and holds their ETA tasks
  in worker memory) is bound straight to ``celery_delayed_delivery`` with 28
  ``*`` words and its name (and its binding key), so queues ``q`` and ``x.q``
  never see each other's messages.

Level queues are quorum queues (``x-overflow: reject-publish`` and
``x-dead-letter-strategy: at-least-once``), as Celery declares them by default.
"""

from __future__ import annotations

import re
from typing import Any

from .entities import Queue

__all__ = [
    "DELIVERY_EXCHANGE",
    "FIRST_EXCHANGE",
    "LEVELS",
    "MAX_DELAY",
    "declare_ladder",
    "delayed_routing_key",
    "destination_bindings",
    "has_delay_prefix",
    "is_delay_exchange",
    "level_name",
    "level_queue_arguments",
    "strip_delay_prefix",
    "undelayed_routing_key",
]

# -- names and limits (the same as Celery's, so both share one broker) -------------------
LEVELS = 28
MAX_LEVEL = LEVELS - 1
MAX_DELAY = 2**LEVELS - 1
LEVEL_PREFIX = "celery_delayed_"
DELIVERY_EXCHANGE = "celery_delayed_delivery"
FIRST_EXCHANGE = f"{LEVEL_PREFIX}{MAX_LEVEL}"
DEFAULT_LEVEL_QUEUE_TYPE = "quorum"

_PREFIX_RE = re.compile(r"^(?:[01]\.){" + str(LEVELS) + "}")
_EXACT_PREFIX = "*." * LEVELS


def level_name(level: int) -> str:
    """The exchange and queue name of ``level`` (0..27)."""
    return f"{LEVEL_PREFIX}{level}"


def is_delay_exchange(name: str) -> bool:
    """True for the ladder's exchanges and the final delivery exchange."""
    return name.startswith(LEVEL_PREFIX)


def strip_delay_prefix(routing_key: str) -> str:
    """``routing_key`` without a leading 28-digit delay prefix (retries must not grow it)."""
    return _PREFIX_RE.sub("", routing_key, count=1)


def has_delay_prefix(routing_key: str) -> bool:
    """True when ``routing_key`` starts with the 28 delay digits."""
    return _PREFIX_RE.match(routing_key) is not None


def undelayed_routing_key(routing_key: str) -> str:
    """The key that takes a message through ``celery_delayed_delivery`` without waiting."""
    return "0." * LEVELS + strip_delay_prefix(routing_key)


def delayed_routing_key(delay: int, routing_key: str) -> str:
    """The ladder routing key for ``delay`` whole seconds (1..MAX_DELAY) to ``routing_key``.

    Raises:
        ValueError: ``delay`` is out of range.
    """
    if not 1 <= delay <= MAX_DELAY:
        raise ValueError(f"a broker-side delay must be 1..{MAX_DELAY} s, not {delay}")
    bits = format(delay, f"0{LEVELS}b")
    return ".".join(bits) + "." + strip_delay_prefix(routing_key)


def level_queue_arguments(level: int, queue_type: str = DEFAULT_LEVEL_QUEUE_TYPE) -> dict[str, Any]:
    """The arguments of level ``level``'s queue, exactly as Celery declares them."""
    arguments: dict[str, Any] = {
        "x-queue-type": queue_type,
        "x-overflow": "reject-publish",
        "x-message-ttl": (2**level) * 1000,
        "x-dead-letter-exchange": level_name(level - 1) if level else DELIVERY_EXCHANGE,
    }
    if queue_type == "quorum":
        arguments["x-dead-letter-strategy"] = "at-least-once"
    return arguments


def level_bindings(level: int) -> tuple[str, str]:
    """``(queue key, next exchange key)`` of level ``level``: digit 1 parks, digit 0 skips."""
    skip = "*." * (MAX_LEVEL - level)
    return f"{skip}1.#", f"{skip}0.#"


def destination_bindings(queue: Queue) -> list[tuple[str, str, str, str]]:
    """The final-hop bindings that bring delayed messages to ``queue``.

    Returns:
        ``(kind, destination, source, key)`` tuples where ``kind`` is ``"queue"``
        (``queue_bind``) or ``"exchange"`` (``exchange_bind``).
    """
    exchange = queue.bound_exchange
    if exchange.name and exchange.type != "direct":
        key = queue.bound_routing_key
        key = key if key.startswith("#") else f"#.{key}"
        return [
            ("exchange", exchange.name, DELIVERY_EXCHANGE, key),
            ("queue", queue.name, exchange.name, key),
        ]
    keys = dict.fromkeys([queue.name, queue.bound_routing_key])
    return [("queue", queue.name, DELIVERY_EXCHANGE, _EXACT_PREFIX + key) for key in keys]


def direct_binding(queue_name: str) -> tuple[str, str, str, str]:
    """The final-hop binding for a queue reached through the default exchange."""
    return ("queue", queue_name, DELIVERY_EXCHANGE, _EXACT_PREFIX + queue_name)


def declare_ladder(channel: Any, queue_type: str = DEFAULT_LEVEL_QUEUE_TYPE) -> None:
    """Declare the 28 levels and the delivery exchange on a py-amqp ``channel``.

    Idempotent, and equivalent to Celery's declarations, so either side may go first.
    """
    for level in range(MAX_LEVEL, -1, -1):
        name = level_name(level)
        channel.exchange_declare(exchange=name, type="topic", durable=True, auto_delete=False)
        channel.queue_declare(queue=name, durable=True, exclusive=False, auto_delete=False,
                              arguments=level_queue_arguments(level, queue_type))
        park_key, _skip_key = level_bindings(level)
        channel.queue_bind(queue=name, exchange=name, routing_key=park_key)
    channel.exchange_declare(exchange=DELIVERY_EXCHANGE, type="topic", durable=True,
                             auto_delete=False)
    for level in range(MAX_LEVEL, -1, -1):
        _park_key, skip_key = level_bindings(level)
        target = level_name(level - 1) if level else DELIVERY_EXCHANGE
        channel.exchange_bind(destination=target, source=level_name(level), routing_key=skip_key)
