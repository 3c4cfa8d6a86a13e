"""Acks on the consuming channel: as few ``basic.ack`` frames as possible, and which ones
RabbitMQ has processed.

``plan``: when a batch holds every held message up to some delivery tag, one
``basic.ack(multiple=True)`` settles them all (py-spy on a no-op drain showed a frame write
per ack as a fifth of the consumer's time); the others go one by one.

``Confirms``: AMQP 0-9-1 does not answer ``basic.ack``, but a channel handles its methods
in order: the ``basic.qos-ok`` of a ``basic.qos`` sent after some acks (with the bound the
channel already has, so nothing changes) means the broker has processed them. ``Confirms``
sends that ``basic.qos`` without waiting and counts the ``qos-ok`` frames as py-amqp reads
them (while the transport polls), so an early ack costs the consumer one socket write, not
a round trip: the ack and ``basic.qos`` frames are packed here and written at once
(through py-amqp's ``basic_ack`` and ``send_method`` the same two frames took four times
the CPU, and the consumer's CPU is what a no-op drain is made of). ``wait`` blocks for one
``qos-ok`` when a caller needs it (``set_prefetch``, ``consume``). Every ``basic.qos`` of
the consuming channel goes through here, so each ``qos-ok`` is matched to the one it
answers, in order. What was sent and not confirmed when the link drops is
``unconfirmed()``: the broker may or may not have it.

It relies on py-amqp 5.x's internals (the channel's ``_callbacks``, keyed by method, and
the connection's ``transport.write``; the ``amqp`` extra is pinned below 6 for ``amqp_io``
already).
"""

from __future__ import annotations

import collections
import contextlib
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from amqp import spec

from .base import Message

__all__ = ["Confirms", "plan"]

_ACK = (60, 80)  # basic.ack: delivery tag (64 bits), multiple (a bit, in an octet)
_QOS = (60, 10)  # basic.qos: prefetch size (32 bits), prefetch count (16), global (a bit)
_FRAME_END = b"\xce"


def plan(held: Mapping[int, Message], batch: set[int]) -> tuple[int | None, list[int]]:
    """The ``basic.ack`` frames for the delivery tags in ``batch`` (all held): the highest
    tag up to which every held message is in the batch (one ``multiple`` ack, or None),
    and the tags above it, acked one by one."""
    upto = None
    for tag in sorted(held):
        if tag not in batch:
            break
        upto = tag
    return upto, [tag for tag in sorted(batch) if upto is None or tag > upto]


def _method(channel: int, method: tuple[int, int], args: bytes) -> bytes:
    payload = struct.pack(">HH", *method) + args
    return struct.pack(">BHI", 1, channel, len(payload)) + payload + _FRAME_END


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

    def send(self, channel: Any, prefetch_count: int) -> int:
        """Write a ``basic.qos``; return its number (for ``wait``)."""
        channel.send_method(spec.Basic.Qos, "lBb", (0, prefetch_count, False))
        self._sent += 1
        return self._sent

    def ack(self, conn: Any, channel: Any, upto: int | None, singles: Sequence[int],
            prefetch_count: int, acked: Sequence[Message]) -> None:
        """Write the ``basic.ack`` frames of ``plan`` and a ``basic.qos`` after them, in one
        write; ``acked`` stays ``unconfirmed()`` until its ``qos-ok`` is read."""
        number = channel.channel_id
        frames = [_method(number, _ACK, struct.pack(">QB", upto, 1))] if upto is not None else []
        frames += [_method(number, _ACK, struct.pack(">QB", tag, 0)) for tag in singles]
        frames.append(_method(number, _QOS, struct.pack(">IHB", 0, prefetch_count, 0)))
        self._sent += 1
        self._acked.append((self._sent, acked))  # before the write: a failed one is unsure
        conn.transport.write(b"".join(frames))
        conn.bytes_sent += 1  # as py-amqp's own writes count (heartbeats)

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
