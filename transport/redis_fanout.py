"""Fanout exchanges on Redis: kombu's PUBLISH/PSUBSCRIBE channels, on their own connection.

A fanout queue ``Q`` bound to exchange ``E`` with key ``K`` is a PSUBSCRIBE to
``<global prefix>/{db}.E`` (``/{db}.E/K`` with ``#`` as ``*`` when ``K`` is not empty), as
kombu subscribes Celery's pidbox and event queues. Only live subscribers receive a
message; nothing is held or acknowledged. Used by ``RedisTransport`` inside its
``translate_errors`` blocks.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import redis
import redis.client

from .errors import DecodeError
from .redis_layout import Decoded, decode_envelope, text

__all__ = ["FanoutSubscriber"]

logger = logging.getLogger("taskframe.transport.redis")


class FanoutSubscriber:
    """The PSUBSCRIBE connection of one transport and the queues each pattern feeds."""

    def __init__(self, client: redis.Redis) -> None:
        self._pubsub: redis.client.PubSub = client.pubsub(
            ignore_subscribe_messages=True)
        self._queues: dict[str, list[str]] = {}  # pattern -> queue names

    def __bool__(self) -> bool:
        return bool(self._queues)

    def add(self, pattern: str, queue: str) -> None:
        """Deliver messages on channels matching ``pattern`` to ``queue``."""
        names = self._queues.setdefault(pattern, [])
        if queue not in names:
            names.append(queue)
        self._pubsub.psubscribe(pattern)

    def remove(self, queue: str) -> None:
        """Stop delivering to ``queue``; unsubscribe patterns nobody needs any more."""
        for pattern, names in list(self._queues.items()):
            if queue in names:
                names.remove(queue)
                if not names:
                    del self._queues[pattern]
                    self._pubsub.punsubscribe(pattern)  # type: ignore[no-untyped-call]

    def receive(self, wait: float) -> list[tuple[str, Decoded]]:
        """Wait up to ``wait`` seconds for messages; return ``(queue, envelope)`` pairs."""
        received: list[tuple[str, Decoded]] = []
        item = self._pubsub.get_message(timeout=wait)
        while item is not None:
            if item.get("type") == "pmessage":
                received += self._deliveries(item)
            item = self._pubsub.get_message(timeout=0.0)
        return received

    def _deliveries(self, item: dict[str, object]) -> list[tuple[str, Decoded]]:
        channel = text(item["channel"])  # type: ignore[arg-type]
        try:
            envelope = decode_envelope(item["data"])  # type: ignore[arg-type]
        except DecodeError as exc:
            logger.warning("unreadable fanout message on %r: %s", channel, exc)
            return []
        pattern = text(item["pattern"])  # type: ignore[arg-type]
        return [(queue, envelope) for queue in self._queues.get(pattern, [])]

    def pending(self) -> bool:
        """True when a message is already buffered or readable."""
        connection: Any = self._pubsub.connection  # None before the first subscribe
        return connection is not None and bool(connection.can_read(timeout=0))

    def socket(self) -> socket.socket | None:
        """The subscription's socket, for ``select`` (``None`` before the first subscribe)."""
        connection: Any = self._pubsub.connection
        return None if connection is None else getattr(connection, "_sock", None)

    def close(self) -> None:
        self._pubsub.close()
