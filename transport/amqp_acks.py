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

``Held``: the deliveries the channel holds, by delivery tag, with its ``Confirms``. Pool
slots write early acks while the loop reads and writes (``acks_from_any_thread``): the
link's lock, which every frame write takes, also makes each step here whole (a plan and
its frames, a ``basic.qos`` and its number), so no tag is acked twice and each ``qos-ok``
matches the ``basic.qos`` it answers.

It relies on py-amqp 5.x's internals (the channel's ``_callbacks``, keyed by method, and
the connection's ``transport.write``; the ``amqp`` extra is pinned below 6 for ``amqp_io``
already).
"""

from __future__ import annotations

import collections
import contextlib
import struct
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from typing import Any

from amqp import spec

from .base import Message, MessageState
from .errors import MessageStateError

__all__ = ["Confirms", "Held", "plan"]

_ACK = (60, 80)  # basic.ack: delivery tag (64 bits), multiple (a bit, in an octet)
_QOS = (60, 10)  # basic.qos: prefetch size (32 bits), prefetch count (16), global (a bit)
_FRAME_END = b"\xce"


def plan(held: Collection[int], batch: set[int]) -> tuple[int | None, list[int]]:
    """The ``basic.ack`` frames for the delivery tags in ``batch`` (all ``held``): the
    highest tag up to which every held message is in the batch (one ``multiple`` ack, or
    None), and the tags above it, acked one by one."""
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

    def __init__(self, lock: Any) -> None:
        self._lock = lock  # the link's: held around each send and each count
        self._sent = 0  # basic.qos frames sent on the channel
        self._confirmed = 0  # and answered
        self._acked: collections.deque[tuple[int, Sequence[Message]]] = collections.deque()
        #: Acks written while a ``basic.qos`` was out: the next one confirms them.
        self._waiting: list[Message] = []
        self._conn: Any = None
        self._channel: Any = None
        self._bound = 0  # the prefetch count a probe repeats

    def bind(self, conn: Any, channel: Any) -> None:
        """Count the ``qos-ok`` frames of ``channel`` (a new link: nothing is pending)."""
        with self._lock:
            self._sent = self._confirmed = 0
            self._acked.clear()
            self._waiting = []
            self._conn, self._channel = conn, channel
            channel._callbacks[spec.Basic.QosOk] = self._on_qos_ok

    def send(self, channel: Any, prefetch_count: int) -> int:
        """Write a ``basic.qos``; return its number (for ``wait``)."""
        with self._lock:
            channel.send_method(spec.Basic.Qos, "lBb", (0, prefetch_count, False))
            self._bound = prefetch_count
            self._sent += 1
            return self._sent

    def ack(self, upto: int | None, singles: Sequence[int], acked: Sequence[Message]) -> None:
        """Write the ``basic.ack`` frames of ``plan``, and a ``basic.qos`` after them in the
        same write unless one is out already (its ``qos-ok`` sends the next: at most one
        is out, so the loop reads one ``qos-ok`` per round trip, not one per ack, however
        many slots ack); ``acked`` stays ``unconfirmed()`` until a ``qos-ok`` of a
        ``basic.qos`` sent after it is read. The caller holds the lock (from its plan on).
        Written on the connection and channel of ``bind``."""
        conn, number = self._conn, self._channel.channel_id
        frames = [_method(number, _ACK, struct.pack(">QB", upto, 1))] if upto is not None else []
        frames += [_method(number, _ACK, struct.pack(">QB", tag, 0)) for tag in singles]
        self._waiting.extend(acked)  # before the write: a failed one is unsure
        if self._sent == self._confirmed:
            frames.append(self._probe())
        conn.transport.write(b"".join(frames))
        conn.bytes_sent += 1  # as py-amqp's own writes count (heartbeats)

    def _probe(self) -> bytes:
        """The ``basic.qos`` frame that confirms the acks waiting, counted as sent."""
        self._sent += 1
        self._acked.append((self._sent, self._waiting))
        self._waiting = []
        return _method(self._channel.channel_id, _QOS, struct.pack(">IHB", 0, self._bound, 0))

    def _on_qos_ok(self, *args: Any) -> None:
        with self._lock:
            self._confirmed += 1
            while self._acked and self._acked[0][0] <= self._confirmed:
                self._acked.popleft()
            if self._waiting and self._sent == self._confirmed:
                self._conn.transport.write(self._probe())

    def wait(self, conn: Any, number: int, *, tick: Callable[[], None], slice_: float) -> None:
        """Read frames until the ``basic.qos`` ``number`` is answered (deliveries that come
        meanwhile go to their callbacks, as with a synchronous method)."""
        while self._confirmed < number:
            tick()
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=slice_)

    def unconfirmed(self) -> list[Message]:
        """The messages acked and not confirmed yet (the broker may not have the acks)."""
        with self._lock:
            return [message for _, acked in self._acked for message in acked] + self._waiting


class Held:
    """The deliveries one consuming channel holds, by delivery tag, and its ``Confirms``.

    ``lock`` is the link's (``Link.lock``); hold it around ``plan`` and the frames it
    plans. A message being settled otherwise (``settling``: its frame not written yet)
    still counts as held for ``plan``: a ``multiple`` ack over its tag, written first,
    would settle it as acked and make its own frame an error (unknown delivery tag).
    """

    def __init__(self, lock: Any) -> None:
        self.lock = lock
        self.messages: dict[int, Message] = {}
        self.confirms = Confirms(lock)
        self._settling: set[int] = set()

    def __len__(self) -> int:
        return len(self.messages)

    def take(self, messages: Iterable[Message]) -> None:
        """Hold ``messages`` (handed out by ``poll``)."""
        with self.lock:
            for message in messages:
                self.messages[message.delivery_tag] = message

    def release(self, message: Message) -> None:
        """Stop holding ``message`` (about to be settled)."""
        with self.lock:
            if self.messages.get(message.delivery_tag) is not message:
                raise MessageStateError(
                    f"{message!r} is not held by this connection (it came back to its queue "
                    "when the connection that received it closed)"
                )
            del self.messages[message.delivery_tag]

    @contextlib.contextmanager
    def settling(self, message: Message) -> Iterator[None]:
        """Release ``message`` while its frames are written (in the ``with`` block)."""
        with self.lock:
            self.release(message)
            self._settling.add(message.delivery_tag)
        try:
            yield
        finally:
            with self.lock:
                self._settling.discard(message.delivery_tag)

    def plan(self, messages: Sequence[Message]) -> tuple[int | None, list[int]]:
        """Release ``messages`` (all unsettled and held) and return their ack frames
        (``plan``; one message: its own frame, without sorting every held tag)."""
        if len(messages) == 1:
            messages[0]._check_unsettled()
            self.release(messages[0])
            return None, [messages[0].delivery_tag]
        for message in messages:
            message._check_unsettled()
            if self.messages.get(message.delivery_tag) is not message:
                self.release(message)  # raises MessageStateError
        upto, singles = plan(self.messages.keys() | self._settling,
                             {message.delivery_tag for message in messages})
        for message in messages:
            del self.messages[message.delivery_tag]
        return upto, singles

    def ack_early(self, messages: Sequence[Message]) -> None:
        """Plan and write the acks of ``messages`` (``Confirms.ack``); they count as ACKED
        before the write (one that fails may have left)."""
        with self.lock:
            upto, singles = self.plan(messages)
            for message in messages:
                message.state = MessageState.ACKED
            self.confirms.ack(upto, singles, messages)

    def clear(self) -> None:
        with self.lock:
            self.messages.clear()
