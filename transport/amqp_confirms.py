"""Which acks RabbitMQ has processed: a ``basic.qos`` after them, and its ``qos-ok``.

AMQP 0-9-1 does not answer ``basic.ack``, but a channel handles its methods in order:
the ``basic.qos-ok`` of a ``basic.qos`` sent after some acks (with the bound the channel
already has, so nothing changes) means the broker has processed them. ``Confirms``
sends that ``basic.qos`` without waiting and counts the ``qos-ok`` frames as py-amqp
reads them (while the transport polls), so an early ack costs the consumer a frame
write, not a round trip; ``wait`` blocks for one when a caller needs it (``set_prefetch``,
``consume``). Every ``basic.qos`` of the consuming channel goes through here, so each
``qos-ok`` is matched to the one it answers, in order.

What was sent and not confirmed when the link drops is ``unconfirmed()``: the broker
may or may not have it.

It relies on py-amqp 5.x's channel internals (``_callbacks``, keyed by method; the
``amqp`` extra is pinned below 6 for ``amqp_io`` already).
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

from amqp import spec

from .base import Message

__all__ = ["Confirms"]


class Confirms:
    """The ``basic.qos`` frames sent on one consuming channel and not answered yet."""

    def __init__(self) -> None:
        self._sent = 0  # basic.qos frames sent on the channel
        self._confirmed = 0  # and answered
        self._acked: collections.deque[tuple[int, Sequence[Message]]] = collections.deque()

    def bind(self, channel: Any) -> None:
        """Count the ``qos-ok`` frames of ``channel`` (a new link: nothing is pending)."""
        self._sent = self._confirmed = 0
        self._acked.clear()
        channel._callbacks[spec.Basic.QosOk] = self._on_qos_ok

    def send(self, channel: Any, prefetch_count: int,
             acked: Sequence[Message] = ()) -> int:
        """Write a ``basic.qos`` after ``acked`` (written already); return its number."""
        channel.send_method(spec.Basic.Qos, "lBb", (0, prefetch_count, False))
        self._sent += 1
        if acked:
            self._acked.append((self._sent, acked))
        return self._sent

    def _on_qos_ok(self, *args: Any) -> None:
        self._confirmed += 1
        while self._acked and self._acked[0][0] <= self._confirmed:
            self._acked.popleft()

    def wait(self, conn: Any, number: int, *, tick: Callable[[], None], slice_: float) -> None:
        """Read frames until the ``basic.qos`` ``number`` is answered (deliveries that come
        meanwhile go to their callbacks, as with a synchronous method)."""
        while self._confirmed < number:
            tick()
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=slice_)

    def unconfirmed(self) -> list[Message]:
        """The messages acked and not confirmed yet (the broker may not have the acks)."""
        return [message for _, acked in self._acked for message in acked]

    @property
    def pending(self) -> int:
        """``basic.qos`` frames sent and not answered yet."""
        return self._sent - self._confirmed

