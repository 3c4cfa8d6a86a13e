"""The messages a Redis transport holds, from the claim to the ack, requeue or give-back.

Held messages live in kombu's ``unacked`` hash (tag -> ``[envelope, exchange,
routing_key]``) and ``unacked_index`` sorted set (tag -> time of claim or last refresh),
shared with Celery workers (see ``taskframe.transport.redis``). ``Claims`` is one
transport's book of them: the list each held tag was taken from, and the acks of
``ack_many`` that wait to ride on the next claim script. It runs the claim script, acks
and requeues, refreshes the claims' scores and gives back what is held on close.

Its methods take the redis-py client (and the script they run) from the transport, and
translate redis-py's errors themselves.

A delivery belongs to the transport object, not to its socket (``keeps_deliveries``):
an ack, reject or requeue that cannot be written because the link failed waits in
``acks_due`` / ``requeues_due``, and ``resume`` writes them once the transport has
connected again, then renews every claim at once. Before, a reconnect gave back every
held message, the running tasks' too (a short blip ran acks_late tasks twice, side by
side), and what a dead server could not take back stayed stuck for the visibility
timeout.

Every method holds ``lock``: pool slots write early acks (``ack_early``) while the loop
claims, settles and refreshes.
"""

from __future__ import annotations

import collections
import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

import redis
from redis.commands.core import Script

from . import redis_upkeep as upkeep
from .base import Message, MessageState
from .errors import ConnectionLost, TransportError
from .redis_layout import KeyLayout, mark_dead, mark_redelivered, text, translate_errors

__all__ = ["Claims"]

logger = logging.getLogger("taskframe.transport.redis")


_F = TypeVar("_F", bound=Callable[..., Any])


def _locked(method: _F) -> _F:
    """Run ``method`` under the book's lock: pool slots write early acks (``ack_early``)
    while the loop claims, settles and refreshes."""
    @functools.wraps(method)
    def locked(self: Claims, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return method(self, *args, **kwargs)

    return cast(_F, locked)


class Claims:
    """The messages one transport holds in ``unacked``, and its acks not sent yet.

    Args:
        layout: the transport's key names.
        visibility_timeout: how long a claim lasts unrefreshed (seconds).
        owner: how log messages name the transport.
    """

    def __init__(self, layout: KeyLayout, visibility_timeout: float, owner: str) -> None:
        #: Held by every method: the loop's thread and pool slots (``ack_early``) use it.
        self.lock = threading.RLock()
        #: Held messages: tag -> the list key each was taken from. The transport records
        #: a message here as it hands it out (after ``claim``).
        self.held: dict[str, str] = {}
        #: Tags acked by ``ack_later``, or acked or rejected while the link was down; the
        #: next claim (or ``send_acks``) removes them.
        self.acks_due: list[str] = []
        #: Tags requeued while the link was down -> their list; ``resume`` requeues them.
        self.requeues_due: dict[str, str] = {}
        #: Of those, the ones requeued otherwise than plainly -> how (``requeue``'s ``how``).
        self.how_due: dict[str, str] = {}
        #: Claim times (as sent) of claims whose reply was lost; ``resume`` gives back what
        #: they took.
        self.unsure_claims: list[str] = []
        self._maybe_acked: set[str] = set()  # acks of those claims: not missed if gone
        #: Early acks written by ``ack_early`` whose replies were not read yet, and the
        #: connection (out of the client's pool) they were written on.
        self._in_flight: collections.deque[list[str]] = collections.deque()
        self._lane: Any = None
        self._lane_client: redis.Redis | None = None
        self._layout = layout
        self._unacked = layout.key(layout.unacked)
        self._index = layout.key(layout.unacked_index)
        self._visibility_timeout = visibility_timeout
        self._owner = owner
        self._refreshed_at = 0.0

    def claim(self, client: redis.Redis, script: Script, keys: Sequence[str],
              queues: Sequence[str], limit: int) -> list[Any]:
        """Send the acks due, then take up to ``limit`` messages from ``keys``: one script.

        ``queues[i]`` is the queue of list ``keys[i]``. Returns the script's flat reply for
        the messages taken: tag, envelope, 1-based index in ``keys``, for each. The lock
        is not held during the round trip (slots ack meanwhile); the caller records what
        it took in ``held``.
        """
        with self.lock:
            self.collect_acks(wait=False)  # the replies that came; the rest wait
            acks, self.acks_due = self.acks_due, []
        stamp = repr(time.time())  # the score of what it takes, exactly as sent
        try:
            with translate_errors("taking messages"):
                reply = script(
                    keys=[self._unacked, self._index, *keys],
                    args=[limit, stamp, f"taskframe-{uuid.uuid4()}-", len(acks), *acks,
                          *queues],
                    client=client,
                )
        except TransportError as exc:
            with self.lock:
                self.acks_due = acks + self.acks_due  # sent again (they are idempotent)
                if isinstance(exc, ConnectionLost):
                    # The script may have run and its reply been lost (a server stopping, a
                    # link cut): what it took is in ``unacked`` scored ``stamp``, known to
                    # nobody, and its acks may be done. ``resume`` gives the one back.
                    self.unsure_claims.append(stamp)
                    self._maybe_acked.update(acks)
            raise
        lost = int(reply[0])
        for tag in reply[1:1 + lost]:
            self.warn_lost("ack", text(tag))
        taken: list[Any] = reply[1 + lost:]
        return taken

    @_locked
    def ack_later(self, messages: Sequence[Message]) -> None:
        """Ack held messages; the acks reach Redis with the next claim, in its script.

        py-spy on a no-op drain showed one pipeline round trip per ack taking a third
        of the consumer's time, then (batched in one MULTI/EXEC) a fifth, next to the
        claim's own round trip. Now the ZREM and HDEL of each tag run at the start of
        the claim script, or on their own (``send_acks``) when no claim comes first:
        a poll that takes nothing, ``maintain()``, ``close()``. Until then the messages
        are no longer refreshed; a crash in between runs them again, as a lost ack would.
        """
        for message in messages:
            message._check_unsettled()
        for message in messages:
            tag = str(message.delivery_tag)
            if self.held.pop(tag, None) is not None:
                self.acks_due.append(tag)
            message.state = MessageState.ACKED

    @_locked
    def send_acks(self, client: redis.Redis | None) -> None:
        """Send the acks that ``ack_later`` keeps for the next claim, in one MULTI/EXEC.

        If the link fails (or is down: ``client`` None) they stay due, for the next try.
        """
        self.collect_acks()
        if not self.acks_due:
            return
        if client is None:
            raise ConnectionLost(f"{self._owner}: not connected")
        acks, self.acks_due = self.acks_due, []
        try:
            with translate_errors(f"ack of {len(acks)} message(s)"):
                pipe = client.pipeline()
                pipe.zrem(self._index, *acks)
                for tag in acks:
                    pipe.hdel(self._unacked, tag)
                removed = pipe.execute()[1:]
        except TransportError:
            self.acks_due = acks + self.acks_due  # sent again on the next try
            self._maybe_acked.update(acks)  # the reply may be what was lost
            raise
        for tag, count in zip(acks, removed, strict=True):
            if not count and tag not in self._maybe_acked:
                self.warn_lost("ack", tag)
        self._maybe_acked.difference_update(acks)

    @_locked
    def ack_early(self, client: redis.Redis | None, messages: Sequence[Message]) -> None:
        """Ack ``messages`` (with the acks due): a ZREM and an HDEL written now, on a
        connection of their own, their replies read later (``collect_acks``: at the next
        claim, ``send_acks`` or ``resume``).

        The tasks of early acks start once their acks are written; waiting for the reply
        as well cost a round trip per start (no-op drain, solo: 3,600 -> 2,070 tasks/s).
        The commands are packed here (redis-py's packing and a MULTI/EXEC took three times
        the CPU of the consumer's write). A reply that does not come (the link failed)
        leaves the acks due: ``resume`` writes them again after the reconnect (they are
        idempotent).

        Raises:
            ConnectionLost: they could not be written; they wait in ``acks_due``.
        """
        self.ack_later(messages)
        if client is None:
            raise ConnectionLost(f"{self._owner}: not connected")
        tags, self.acks_due = self.acks_due, []
        if not tags:
            return
        try:
            with translate_errors(f"ack of {len(tags)} message(s)"):
                self._lane_for(client).send_packed_command(
                    [_command("ZREM", self._index, *tags) + _command("HDEL", self._unacked, *tags)],
                    check_health=False)  # a PING would read an ack's reply
        except TransportError:
            self.acks_due = tags + self.acks_due
            self._maybe_acked.update(tags)
            self._lane_lost()
            raise
        self._in_flight.append(tags)

    @_locked
    def collect_acks(self, *, wait: bool = True) -> None:
        """Read the replies of the acks ``ack_early`` wrote (without ``wait``: the ones
        that arrived); if one fails, every ack not confirmed is due again (and raised: the
        link is lost or the server refused)."""
        while self._in_flight:
            tags = self._in_flight[0]
            try:
                with translate_errors(f"ack of {len(tags)} message(s)"):
                    if not wait and not self._lane.can_read(timeout=0):
                        return
                    self._lane.read_response()  # ZREM's count
                    removed = int(self._lane.read_response())  # HDEL's
            except TransportError:
                self._lane_lost()
                raise
            self._in_flight.popleft()
            if removed < len(tags) and not self._maybe_acked.issuperset(tags):
                logger.warning(
                    "%s: early ack of %d message(s): %d were no longer held (restored after "
                    "the visibility timeout of %.1f s?); another consumer may run them again",
                    self._owner, len(tags), len(tags) - removed, self._visibility_timeout)
            self._maybe_acked.difference_update(tags)

    def _lane_for(self, client: redis.Redis) -> Any:
        if self._lane_client is not client:
            self._lane_lost()  # a new link: what the old one did not confirm goes again
            self._lane = client.connection_pool.get_connection()
            self._lane_client = client
        return self._lane

    def _lane_lost(self) -> None:
        """The early acks whose replies were not read: due again, maybe done already."""
        unread = [tag for tags in self._in_flight for tag in tags]
        self._in_flight.clear()
        self.acks_due = unread + self.acks_due
        self._maybe_acked.update(unread)
        self._drop_lane()

    def _drop_lane(self) -> None:
        lane, client = self._lane, self._lane_client
        self._lane = self._lane_client = None
        if lane is not None and client is not None:
            lane.disconnect()
            client.connection_pool.release(lane)

    @_locked
    def forget(self, client: redis.Redis | None, tag: str, action: str) -> None:
        """Remove held message ``tag`` from ``unacked`` (``action``: an ack or a reject).

        If the link is down (``client`` None, or it fails now) the removal waits in
        ``acks_due`` for the next claim or ``resume``: the message counts as settled.
        """
        # Not refreshed any more: if the ack never lands, the message is restored after
        # the visibility timeout instead of being held forever.
        del self.held[tag]
        try:
            if client is None:
                raise ConnectionLost("not connected")
            with translate_errors(f"{action} of message {tag}"):
                pipe = client.pipeline()
                pipe.zrem(self._index, tag)
                pipe.hdel(self._unacked, tag)
                _, removed = pipe.execute()
        except TransportError as exc:
            self.acks_due.append(tag)
            if not isinstance(exc, ConnectionLost):
                raise
            logger.info("%s: %s of message %s waits for the link (%s)", self._owner, action,
                        tag, exc)
            return
        if not removed:
            self.warn_lost(action, tag)

    @_locked
    def requeue(self, client: redis.Redis | None, script: Script, tag: str, *,
                how: str = "requeue", dead: str | None = None) -> None:
        """Put held message ``tag`` back at the back of the list it came from, once.

        ``how``: ``"failed"`` counts its delivery as failed; ``"dead"`` pushes it to list
        ``dead`` (a dead-letter queue) instead, its failed deliveries dropped. If the
        link is down the requeue waits in ``requeues_due`` for ``resume``.
        """
        key = self.held.pop(tag)
        if dead is not None:
            key = dead
        try:
            if client is None:
                raise ConnectionLost("not connected")
            done = self._requeue(client, script, tag, key, how)
        except TransportError as exc:
            self.requeues_due[tag] = key
            if how != "requeue":
                self.how_due[tag] = how
            if not isinstance(exc, ConnectionLost):
                raise
            logger.info("%s: requeue of message %s waits for the link (%s)", self._owner, tag,
                        exc)
            return
        if not done:
            self.warn_lost("requeue", tag)

    def _requeue(self, client: redis.Redis, script: Script, tag: str, key: str,
                 how: str = "requeue") -> int:
        with translate_errors(f"requeue of message {tag}"):
            value = client.hget(self._unacked, tag)
            if value is None:
                return 0
            raw = _marked(upkeep.stored_envelope(text(value)), how)
            return int(script(keys=[self._unacked, self._index, key],
                              args=[tag, raw, "LPUSH"], client=client))

    @_locked
    def resume(self, client: redis.Redis, scripts: Mapping[str, Script],
               exchange_types: Mapping[str, str]) -> None:
        """After connecting again: write the settles that waited for the link, give back
        what claims with a lost reply took, renew every claim now (a claim the server
        lost, restarted without its data or restored by another consumer after the
        visibility timeout, is logged)."""
        if self._lane_client is not client:
            self._lane_lost()  # replies of early acks lost with the old link
        self.send_acks(client)
        for tag, key in list(self.requeues_due.items()):
            if not self._requeue(client, scripts["requeue"], tag, key,
                                 self.how_due.pop(tag, "requeue")):
                self.warn_lost("requeue", tag)
            del self.requeues_due[tag]
        while self.unsure_claims:
            stamp = self.unsure_claims[0]
            with translate_errors("giving back what a claim with a lost reply took"):
                given = upkeep.give_back_unsure(client, self._layout, scripts, stamp,
                                                self.held, exchange_types)
            if given:
                logger.info("%s: gave back %d message(s) taken by a claim whose reply was "
                            "lost", self._owner, given)
            self.unsure_claims.pop(0)
        self.refresh(client, time.time(), force=True)

    @_locked
    def refresh(self, client: redis.Redis, now: float, *, force: bool = False) -> None:
        """Score every held message ``now``, so no restorer (ours or kombu's) takes it.

        At most every tenth of the visibility timeout (and every 30 s), unless ``force``.
        """
        due = now - self._refreshed_at >= min(self._visibility_timeout / 10, 30.0)
        if not self.held or not (due or force):
            return
        with translate_errors("refreshing claims"):
            changed = upkeep.refresh_claims(client, self._layout, self.held, now)
        self._refreshed_at = now
        if changed < len(self.held):
            logger.warning("%s: %d held message(s) lost their claim; another consumer may "
                           "run them", self._owner, len(self.held) - changed)

    @_locked
    def release(self, client: redis.Redis, script: Script) -> None:
        """On close: send the acks due and give every held message back to its list.

        What does not reach Redis is logged: those acks are lost (their messages run
        again) and those messages come back after the visibility timeout.
        """
        try:
            self.send_acks(client)
        except TransportError as exc:
            logger.warning("%s: could not ack %d message(s) (%s); they run again after the "
                           "visibility timeout (%.0f s)", self._owner, len(self.acks_due), exc,
                           self._visibility_timeout)
            self.acks_due = []
        if self.held or self.requeues_due:
            held = {**self.held, **self.requeues_due}
            self.held, self.requeues_due = {}, {}
            try:
                self._give_back(client, script, held)
            except TransportError as exc:
                logger.warning(
                    "%s: could not give back %d held message(s) (%s); they come back after "
                    "the visibility timeout (%.0f s)", self._owner, len(held), exc,
                    self._visibility_timeout,
                )

    def _give_back(self, client: redis.Redis, script: Script, held: Mapping[str, str]) -> None:
        with translate_errors("giving back held messages"):
            values = client.hmget(self._unacked, list(held))
            for (tag, key), value in zip(held.items(), values, strict=True):
                if value is None:
                    continue
                raw = _marked(upkeep.stored_envelope(text(value)), self.how_due.pop(tag, "requeue"))
                script(
                    keys=[self._unacked, self._index, key],
                    args=[tag, raw, "RPUSH"], client=client,
                )

    @_locked
    def abandon(self) -> None:
        """On close with the link down: log what stays in ``unacked`` (it comes back after
        the visibility timeout) and forget it."""
        self._lane_lost()
        waiting = len(self.held) + len(self.requeues_due) + len(self.acks_due)
        if waiting:
            logger.warning(
                "%s: closed while the broker was unreachable: %d held message(s) and settles "
                "could not be written; they come back after the visibility timeout (%.0f s)",
                self._owner, waiting, self._visibility_timeout)
        self.held, self.requeues_due, self.acks_due, self.how_due = {}, {}, [], {}
        self.unsure_claims, self._maybe_acked = [], set()

    def warn_lost(self, action: str, tag: str) -> None:
        """Log that ``tag`` was no longer held when ``action`` came (it may run twice)."""
        logger.warning(
            "%s: %s of message %s: it was no longer held (restored after the visibility "
            "timeout of %.1f s?); another consumer may run it again",
            self._owner, action, tag, self._visibility_timeout,
        )


def _marked(raw: str, how: str) -> str:
    """The envelope ``raw`` as it goes back: redelivered, one more failed delivery
    (``failed``), or with its failed deliveries dropped (``dead``: a dead-letter queue)."""
    if how == "dead":
        return mark_dead(raw)
    return mark_redelivered(raw, failed=how == "failed")


def _command(*args: str) -> bytes:
    """One Redis command in the protocol's request form (an array of bulk strings)."""
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)
