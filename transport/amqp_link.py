"""The RabbitMQ transport's link to the broker: one py-amqp connection, its channels, its errors.

A ``Link`` opens the connection with two channels: ``pub`` for declarations and
publishing (in confirm mode) and ``sub`` for consumers, QoS and acks. It closes them
with the handshake, or abandons a broken link without one; it sends heartbeats when
due and reads frames that already arrived without waiting. ``translate`` is the one
place where py-amqp and socket errors become ``taskframe.transport.errors``: a
dropped link, a missed heartbeat or a forced close is ``ConnectionLost`` (the link is
abandoned), RabbitMQ refusing a command is ``TransportError`` with its reply.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import amqp
from amqp import exceptions as amqp_errors
from amqp import method_framing, spec

from .amqp_io import may_have_frames, read_ahead
from .amqp_messages import describe_error
from .errors import BrokerConnectionError, ConnectionLost, PublishError, TransportError

__all__ = ["Link"]

logger = logging.getLogger("taskframe.transport.amqp")

# poll() waits in slices this long at most, so heartbeats are serviced meanwhile.
# A quarter of the heartbeat keeps two beats inside RabbitMQ's two-interval allowance.
_WAIT_SLICE = 1.0

# py-amqp's connection-level failures: the link is gone (or unusable).
_LINK_ERRORS: tuple[type[BaseException], ...] = (
    amqp_errors.ConnectionError,
    OSError,
    AttributeError,  # py-amqp touching a channel whose connection was torn down
    IndexError,  # py-amqp's frame reader on a truncated stream
)


class Link:
    """One py-amqp connection with a publishing and a consuming channel.

    Args:
        owner: how error and log messages name the transport.
        params: the keyword arguments of ``amqp.Connection``.
        heartbeat: the heartbeat asked for (seconds, 0 = off); the broker's answer
            replaces it on ``open``.
    """

    def __init__(self, owner: str, params: Mapping[str, Any], *, heartbeat: float) -> None:
        self.owner = owner
        self.conn: Any = None
        self.pub: Any = None  # declarations and publishing, confirm mode
        self.sub: Any = None  # consumers, QoS, acks
        #: Longest wait for frames at a time, so heartbeats are serviced meanwhile.
        self.slice = min(_WAIT_SLICE, heartbeat / 4) if heartbeat else _WAIT_SLICE
        self._params = dict(params)
        self._ssl = bool(params.get("ssl"))
        self._last_tick = 0.0
        #: Held around every frame write (py-amqp's and ours), and by the transport around
        #: what a write must match (``amqp_acks.Held``): pool slots write early acks.
        self.lock = threading.RLock()

    def open(self, on_return: Callable[[Any, str, str, Any], None]) -> None:
        """Connect and open the channels; ``on_return`` hears of unroutable messages.

        Raises:
            BrokerConnectionError: the broker cannot be reached, or refused us.
        """
        conn = amqp.Connection(**self._params, frame_writer=self._frame_writer)
        try:
            conn.connect()
            self.pub = conn.channel()
            self.pub.confirm_select()
            self.pub.events["basic_return"].add(on_return)
            self.sub = conn.channel()
        except (amqp_errors.AMQPError, *_LINK_ERRORS) as exc:
            with contextlib.suppress(Exception):
                conn.collect()
            self.pub = self.sub = None
            raise BrokerConnectionError(
                f"cannot connect to {self.owner}: {describe_error(exc)}"
            ) from exc
        self.conn = conn
        if not self._ssl:
            read_ahead(conn)
        self._last_tick = time.monotonic()
        beat = float(conn.heartbeat or 0)  # as negotiated with the broker
        self.slice = min(_WAIT_SLICE, beat / 4) if beat else _WAIT_SLICE

    def _frame_writer(self, conn: Any, transport: Any) -> Callable[..., Any]:
        """py-amqp's frame writer, one frame (or method with content) at a time."""
        write = method_framing.frame_writer(conn, transport)
        lock = self.lock

        def locked(*args: Any) -> Any:
            with lock:
                return write(*args)

        return locked

    def give_back(self, delivery_tag: int) -> None:
        """``basic.nack`` with requeue on the consuming channel (inside ``translate``).

        Not ``basic.reject``: RabbitMQ 4.3+ counts a reject as a failed delivery (the
        quorum queues' ``x-delivery-count``), a nack not. py-amqp has no ``basic_nack``;
        the method frame (delivery tag, multiple, requeue) is sent as it defines it.
        """
        self.sub.send_method(spec.Basic.Nack, "Lbb", (delivery_tag, False, True))

    def close(self) -> None:
        """Close the connection with the handshake; errors are logged, not raised."""
        conn, self.conn = self.conn, None
        self.pub = self.sub = None
        if conn is None:
            return
        try:
            conn.close()
        except (amqp_errors.AMQPError, *_LINK_ERRORS) as exc:
            logger.debug("%s: error while closing: %s", self.owner, describe_error(exc))
            with contextlib.suppress(Exception):
                conn.collect()

    def abandon(self) -> None:
        """Drop a broken link without the closing handshake."""
        conn, self.conn = self.conn, None
        self.pub = self.sub = None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.collect()

    @property
    def connected(self) -> bool:
        return self.conn is not None and bool(self.conn.connected)

    def require(self) -> Any:
        """The connection; ``BrokerConnectionError`` when there is none."""
        if self.conn is None:
            raise BrokerConnectionError(f"{self.owner} is not connected")
        return self.conn

    @contextlib.contextmanager
    def translate(self, what: str, *, channel_lost: bool = False,
                  refused: type[TransportError] = TransportError,
                  abandon: bool = True) -> Iterator[None]:
        """Turn py-amqp and socket errors into ours.

        ``channel_lost``: a channel error means the link is unusable (the consuming
        channel: RabbitMQ dropped its consumers and requeued what it held).
        ``abandon``: drop a link that failed (not from a thread other than the one that
        reads it: the reader would go on with a closed socket; it finds the error itself).
        """
        if self.conn is None:
            raise ConnectionLost(f"{what}: {self.owner} is not connected")
        try:
            yield
        except amqp_errors.ChannelError as exc:
            if channel_lost:
                if abandon:
                    self.abandon()
                raise ConnectionLost(f"{what}: {describe_error(exc)}") from exc
            raise refused(f"{what}: {describe_error(exc)}") from exc
        except amqp_errors.MessageNacked as exc:
            raise PublishError(f"{what}: the broker refused the message (nack)") from exc
        except _LINK_ERRORS as exc:
            if abandon:
                self.abandon()
            raise ConnectionLost(f"{what}: {describe_error(exc)}") from exc

    def tick(self) -> None:
        """Let py-amqp service heartbeats (send ours, check the broker's), once a slice."""
        now = time.monotonic()
        if now - self._last_tick >= self.slice:
            self._last_tick = now
            self.conn.heartbeat_tick()

    def heartbeat(self) -> None:
        """Let py-amqp service heartbeats now, however recently it last did."""
        self._last_tick = time.monotonic()
        self.conn.heartbeat_tick()

    def drain_pending(self, frames: int) -> None:
        """Take in up to ``frames`` frames that already arrived, without waiting."""
        for _ in range(frames):
            if not (self._ssl or may_have_frames(self.conn)):
                return
            try:
                self.conn.drain_events(timeout=0)
            except TimeoutError:
                return
