"""The rows a SQL transport holds: claimed under its token until acked, rejected or released.

A claim marks a row with the transport's token and a deadline (``claimed_until``, now
plus the visibility timeout); a row whose deadline passed is claimable again, so the
messages of a consumer that died go to another. ``Claims`` takes due rows (``UPDATE
... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED) RETURNING``, or a locked ``SELECT``
then an ``UPDATE`` where the database has no ``RETURNING``), deletes or releases them
when settled (only while they still carry the token: a lost claim is logged, as its
message may run twice), pushes the deadlines of held rows back (``refresh``) and
releases them all on close. Each runs in a transaction of the transport's ``Database``.

The token belongs to the transport object, not to its connections (``keeps_deliveries``):
a settle that cannot be written because the database is unreachable waits in
``settles_due``, and ``resume`` writes it once the transport has connected again, then
renews every claim at once. Before, a reconnect made a new transport with a new token:
the rows the old one held stayed claimed by nobody until the visibility timeout and then
ran again, the running tasks' too.

``failed_deliveries`` counts the failed deliveries of ``Message.delivery_count``
(``delivery_count`` counts every claim, for ``redelivered``): a claim of a row that
still carries another claim (it expired: its holder died) adds one, and so does
``requeue_failed``; a requeue or the release on close leave it (they clear the
claim). A dead-lettered row moves to ``<queue>.dead``, unclaimed, its count reset.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from .base import Message, MessageState
from .entities import dead_letter_queue
from .errors import BrokerConnectionError, TransportError
from .sql_database import Database
from .sql_schema import Tables

__all__ = ["Claims", "claimable"]

logger = logging.getLogger("taskframe.transport.sql")


def claimable(messages: sa.Table, queue_names: Sequence[str], now: float) -> sa.ColumnElement[bool]:
    """Rows of ``queue_names`` that are due and not held (or whose claim expired)."""
    return sa.and_(
        messages.c.queue.in_(list(queue_names)),
        messages.c.due_at <= now,
        sa.or_(messages.c.claim.is_(None), messages.c.claimed_until < now),
    )


class Claims:
    """The rows one transport holds, under its claim token.

    Args:
        db: the transport's database.
        tables: the transport's tables.
        visibility_timeout: how long a claim lasts unrefreshed (seconds).
        owner: how log messages name the transport.
    """

    def __init__(self, db: Database, tables: Tables, visibility_timeout: float,
                 owner: str) -> None:
        #: Our claim token: rows we hold carry it, so ack/maintain/close touch only ours.
        self.token = uuid.uuid4().hex
        #: Ids of the rows handed out and not settled yet (the transport adds them).
        self.held: set[int] = set()
        #: Settles that could not be written (the database was unreachable): row id ->
        #: None to delete it (ack, reject), else the values that release it (requeue,
        #: dead-letter: ``released``). ``resume`` writes them.
        self.settles_due: dict[int, dict[str, Any] | None] = {}
        self._db = db
        self._messages = tables.messages
        self._visibility_timeout = visibility_timeout
        self._owner = owner
        self._refreshed_at = 0.0

    def claim(self, queue_names: Sequence[str], limit: int) -> tuple[list[sa.Row[Any]], int]:
        """Claim up to ``limit`` due rows of ``queue_names``, in queue order.

        Returns the rows and what to add to their ``delivery_count`` for this delivery
        (1 where it was read before the claim counted it: no ``RETURNING``).
        """
        messages = self._messages
        now = time.time()
        pick = (
            sa.select(messages.c.id)
            .where(claimable(messages, queue_names, now))
            .order_by(messages.c.priority.desc(), messages.c.due_at, messages.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        # failed_deliveries first: MySQL evaluates SET left to right, with the new claim.
        values = [
            ("failed_deliveries", messages.c.failed_deliveries
             + sa.case((messages.c.claim.is_not(None), 1), else_=0)),
            ("claim", self.token),
            ("claimed_until", now + self._visibility_timeout),
            ("delivery_count", messages.c.delivery_count + 1),
        ]
        columns = [c for c in messages.c if c.name != "claimed_until"]
        returning = self._db.require().dialect.update_returning

        def claim(conn: sa.Connection) -> list[sa.Row[Any]]:
            if returning:
                update = sa.update(messages).where(messages.c.id.in_(pick))
                return list(conn.execute(update.ordered_values(*values).returning(*columns)))
            # No UPDATE ... RETURNING: lock the rows, then mark them, in one transaction.
            rows = list(conn.execute(pick.with_only_columns(*columns)))
            if rows:
                ids = [row.id for row in rows]
                conn.execute(sa.update(messages).where(messages.c.id.in_(ids))
                             .ordered_values(*values))
            return rows

        rows = self._db.run("claiming messages", claim)
        # RETURNING gives no order; restore the queue order.
        rows.sort(key=lambda row: (-row.priority, row.due_at, row.id))
        return rows, 0 if returning else 1

    def settle(self, tag: int, *, delete: bool, action: str,
               release: dict[str, Any] | None = None) -> None:
        """Delete held row ``tag`` (ack, reject) or release it to its queue (requeue).

        ``release``: the values of the release (default ``released()``). If the database
        is unreachable the settle waits in ``settles_due`` for ``resume`` (the message
        counts as settled).
        """
        self.held.discard(tag)
        values = None if delete else (release or self.released())
        try:
            count = self._write(tag, values, action=action)
        except TransportError as exc:
            self.settles_due[tag] = values
            if not isinstance(exc, BrokerConnectionError):
                raise
            logger.info("%s: %s of message %s waits for the database (%s)", self._owner,
                        action, tag, exc)
            return
        if count == 0:
            self._warn_lost(action, tag)

    def released(self, *, failed: bool = False, dead: str | None = None) -> dict[str, Any]:
        """The values that release a held row: back to its queue, or dead-lettered.

        ``failed``: one more failed delivery. ``dead``: the row's queue; the row moves to
        that queue's dead-letter queue, its failed deliveries reset.
        """
        values: dict[str, Any] = {"claim": None, "claimed_until": None}
        if dead is not None:
            values.update(queue=dead_letter_queue(dead), failed_deliveries=0)
        elif failed:
            values["failed_deliveries"] = self._messages.c.failed_deliveries + 1
        return values

    def _write(self, tag: int, values: dict[str, Any] | None, *, action: str) -> int:
        messages = self._messages
        ours = sa.and_(messages.c.id == tag, messages.c.claim == self.token)

        def settle(conn: sa.Connection) -> int:
            if values is None:
                if self._db.postgres:
                    # Losing this commit in a server crash only means a redelivery.
                    conn.execute(sa.text("SET LOCAL synchronous_commit = off"))
                return int(conn.execute(sa.delete(messages).where(ours)).rowcount)
            update = sa.update(messages).where(ours).values(**values)
            count = int(conn.execute(update).rowcount)
            self._db.notify(conn)
            return count

        return self._db.run(f"{action} of message {tag}", settle)

    def _warn_lost(self, action: str, tag: int) -> None:
        logger.warning(
            "%s: %s of message %s: its claim was lost (visibility timeout of %.1fs passed "
            "without maintain()?); another consumer may run it again",
            self._owner, action, tag, self._visibility_timeout,
        )

    def ack_many(self, messages: Sequence[Message], *, now: bool = False) -> None:
        """Delete several held messages' rows in one statement (one commit).

        With the database down the deletes wait in ``settles_due`` (the messages count
        as ACKED); with ``now`` the error is raised too (``Transport.ack_early``).
        """
        for message in messages:
            message._check_unsettled()
        table = self._messages
        tags = [message.delivery_tag for message in messages]
        ours = sa.and_(table.c.id.in_(tags), table.c.claim == self.token)

        def settle(conn: sa.Connection) -> int:
            if self._db.postgres:
                conn.execute(sa.text("SET LOCAL synchronous_commit = off"))
            return int(conn.execute(sa.delete(table).where(ours)).rowcount)

        try:
            count = self._db.run(f"ack of {len(tags)} messages", settle)
        except BrokerConnectionError as exc:
            logger.info("%s: ack of %d messages waits for the database (%s)", self._owner,
                        len(tags), exc)
            self.settles_due.update(dict.fromkeys(tags))
            count = len(tags)
            if now:
                self._settled(messages)
                raise
        self._settled(messages)
        if count < len(tags):
            logger.warning(
                "%s: ack of %d messages: %d claims were lost (visibility timeout of %.1fs "
                "passed without maintain()?); those may run again",
                self._owner, len(tags), len(tags) - count, self._visibility_timeout,
            )

    def _settled(self, messages: Sequence[Message]) -> None:
        for message in messages:
            self.held.discard(message.delivery_tag)
            message.state = MessageState.ACKED

    def resume(self) -> None:
        """After connecting again: write the settles that waited, release the rows a claim
        whose reply was lost took (they carry our token, unknown to us: the refresh would
        keep them claimed for as long as we live), renew every claim now."""
        for tag, values in list(self.settles_due.items()):
            action = "ack" if values is None else "requeue"
            if not self._write(tag, values, action=action):
                self._warn_lost(action, tag)
            del self.settles_due[tag]
        released = self._db.run("releasing rows of a claim with a lost reply",
                                self._release_unknown)
        if released:
            logger.info("%s: released %d message(s) taken by a claim whose reply was lost",
                        self._owner, released)
        self.refresh(force=True)

    def _release_unknown(self, conn: sa.Connection) -> int:
        messages = self._messages
        ours = messages.c.claim == self.token
        if self.held:
            ours = sa.and_(ours, messages.c.id.not_in(list(self.held)))
        count = int(conn.execute(
            sa.update(messages).where(ours).values(claim=None, claimed_until=None)).rowcount)
        if count:
            self._db.notify(conn)
        return count

    def refresh(self, *, force: bool = False) -> None:
        """Push back the deadline of every held row.

        Skipped within a tenth of the visibility timeout of the last refresh (the claims
        are still fresh), unless ``force``.
        """
        now = time.time()
        fresh = now - self._refreshed_at < self._visibility_timeout / 10
        if not self.held or (fresh and not force):
            return
        messages = self._messages
        refresh = (
            sa.update(messages)
            .where(messages.c.claim == self.token)
            .values(claimed_until=now + self._visibility_timeout)
        )
        count = self._db.run("refreshing claims",
                             lambda conn: int(conn.execute(refresh).rowcount))
        self._refreshed_at = now
        if count < len(self.held):
            logger.warning(
                "%s: %d held message(s) lost their claim; another consumer may run them",
                self._owner, len(self.held) - count,
            )

    def release_all(self) -> None:
        """Release every held row at once (on close).

        If the database cannot be reached, they come back anyway once the visibility
        timeout passes.
        """
        try:
            if self.settles_due:
                self.resume()
            if self.held:
                self._db.run("releasing claims", self._release_all)
        except TransportError as exc:
            logger.warning("%s: could not release held messages: %s", self._owner, exc)
        self.held.clear()
        self.settles_due.clear()

    def abandon(self) -> None:
        """On close with the database unreachable: log what stays claimed (it comes back
        after the visibility timeout) and forget it."""
        if self.held or self.settles_due:
            logger.warning(
                "%s: closed while the database was unreachable: %d held message(s) and "
                "settles could not be written; they come back after the visibility timeout "
                "(%.0f s)", self._owner, len(self.held) + len(self.settles_due),
                self._visibility_timeout)
        self.held.clear()
        self.settles_due.clear()

    def _release_all(self, conn: sa.Connection) -> None:
        messages = self._messages
        conn.execute(
            sa.update(messages)
            .where(messages.c.claim == self.token)
            .values(claim=None, claimed_until=None)
        )
        self._db.notify(conn)
