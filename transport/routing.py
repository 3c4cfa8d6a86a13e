"""AMQP exchange routing for transports that emulate exchanges (memory, SQL).

A binding says "messages on exchange E whose routing key matches K go to queue
Q". How a routing key matches depends on the exchange type, as in AMQP 0-9-1:

* ``direct``: the keys are equal.
* ``topic``: the binding key is a pattern of dot-separated words where ``*``
  stands for exactly one word and ``#`` for zero or more words.
* ``fanout``: every bound queue, whatever the key.

The default exchange ``""`` is not routed here: it delivers to the queue named
by the routing key, and transports handle it directly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from .errors import ImproperlyConfigured

__all__ = ["ROUTABLE_TYPES", "Binding", "check_exchange_type", "route", "topic_matches"]

ROUTABLE_TYPES = frozenset({"direct", "topic", "fanout"})


@dataclass(frozen=True)
class Binding:
    """One binding of ``queue`` to ``exchange`` (of ``exchange_type``) with ``routing_key``."""

    exchange: str
    exchange_type: str
    routing_key: str
    queue: str


def check_exchange_type(exchange_type: str) -> None:
    """Raise ``ImproperlyConfigured`` for exchange types these transports cannot route."""
    if exchange_type not in ROUTABLE_TYPES:
        raise ImproperlyConfigured(
            f"exchange type {exchange_type!r} is not supported here "
            f"(supported: {', '.join(sorted(ROUTABLE_TYPES))})"
        )


@lru_cache(maxsize=4096)
def topic_matches(pattern: str, routing_key: str) -> bool:
    """True when the topic binding ``pattern`` matches ``routing_key``."""
    return _match(_words(pattern), _words(routing_key))


def _words(key: str) -> tuple[str, ...]:
    # As in RabbitMQ, the empty key has no words (so "#" matches it and "*" does not).
    return tuple(key.split(".")) if key else ()


def _match(pattern: tuple[str, ...], words: tuple[str, ...]) -> bool:
    # Dynamic programming over (pattern position, word position); patterns are
    # short, so the quadratic table is cheap and avoids regex escaping pitfalls.
    reachable = {0}
    for token in pattern:
        following: set[int] = set()
        for index in reachable:
            if token == "#":
                following.update(range(index, len(words) + 1))
            elif index < len(words) and (token == "*" or token == words[index]):
                following.add(index + 1)
        if not following:
            return False
        reachable = following
    return len(words) in reachable


def route(bindings: Iterable[Binding], routing_key: str) -> list[str]:
    """The queues (in binding order, without repeats) a message with ``routing_key`` reaches."""
    queues: dict[str, None] = {}
    for binding in bindings:
        kind = binding.exchange_type
        if (
            kind == "fanout"
            or (kind == "direct" and binding.routing_key == routing_key)
            or (kind == "topic" and topic_matches(binding.routing_key, routing_key))
        ):
            queues[binding.queue] = None
    return list(queues)
