"""The SQL transport: a message queue in a database table, on SQLAlchemy 2 Core.

Features:
    * SQLite (the embedded default: no server) and PostgreSQL; other
      SQLAlchemy databases with ``SELECT ... FOR UPDATE SKIP LOCKED`` work too.
    * Several consumers, in several processes, on one database: each message is
      claimed by one consumer at a time. PostgreSQL claims with ``UPDATE ...
      WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED) RETURNING``; SQLite runs
      the same statement inside ``BEGIN IMMEDIATE`` (WAL mode, busy timeout).
      Without ``UPDATE ... RETURNING`` (SQLite < 3.35, MariaDB) the claim is a
      locked ``SELECT`` then an ``UPDATE`` in one transaction.
    * Reliable delivery: a claim lasts ``visibility_timeout`` seconds. A consumer
      that dies (``kill -9``) loses its claims when they expire and the messages
      go to another consumer. A live consumer keeps its claims by calling
      ``maintain()`` at least every ``visibility_timeout / 4`` seconds; the
      worker's consumer loop does so. ``close()`` releases claims at once.
      The claims belong to the transport object, not to a database connection
      (``keeps_deliveries``): after ``drop()`` and ``connect()`` they are still
      held, and settles that could not be written are written then.
    * Failed deliveries (``Message.delivery_count``): the ``failed_deliveries``
      column; a claim that expired and a ``requeue_failed`` count, a requeue or the
      release on close do not (``sql_claims``). ``dead_letter`` moves the row to
      the queue ``<queue>.dead``, where it stays until someone consumes or moves it.
    * ``ack`` deletes the row only if it still carries this transport's claim
      token (a warning is logged when the claim was lost, as the message may
      then run twice). On PostgreSQL acks commit with ``synchronous_commit
      off``: a server crash can lose an ack (the message comes back), never a
      message. Deadlocks are retried.
    * Delayed messages (``supports_delay``): ``due_at`` in the future.
    * Priorities (higher first, then ``due_at``, then publish order), exchanges
      (direct, topic, fanout) through a bindings table; ``exchange=""`` delivers
      to the queue named by the routing key.
    * Wake-ups: PostgreSQL (psycopg 3) with LISTEN/NOTIFY; otherwise polling
      every ``polling_interval`` seconds, backing off to ``polling_interval_max``
      while idle. A wait never runs past the next delayed message's due time.

URLs:
    ``sqlite:///relative/file.sqlite3``, ``sqlite:////absolute/file.sqlite3`` and
    ``sqla+<SQLAlchemy URL>``, e.g. ``sqla+postgresql://postgres@127.0.0.1:5432/test``
    (plain ``postgresql://`` uses the psycopg 3 driver, plain ``mysql://`` PyMySQL).
    Whether ``UPDATE ... RETURNING`` is used follows SQLAlchemy's dialect flag,
    which for SQLite is set from ``sqlite3.sqlite_version`` (3.35 or later).

Options (``transport_options``):
    ``table_prefix`` ("taskframe_"), ``visibility_timeout`` (60.0),
    ``polling_interval`` (0.05), ``polling_interval_max`` (0.5),
    ``busy_timeout`` (SQLite, 30.0), ``max_batch`` (100: rows one poll claims
    when there is no prefetch bound), ``connect_timeout`` (4.0).

Clocks: due times and claims use each host's wall clock; keep hosts in sync (NTP).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import sqlalchemy as sa

from .base import Envelope, Message, Transport
from .entities import Exchange, Queue, dead_letter_queue
from .errors import BrokerConnectionError, TransportError
from .routing import Binding, check_exchange_type, route
from .serialization import json_dumps, json_loads
from .sql_claims import Claims, claimable
from .sql_database import Database
from .sql_schema import (
    DEFAULT_MAX_BATCH,
    DEFAULT_POLLING_INTERVAL,
    DEFAULT_POLLING_INTERVAL_MAX,
    DEFAULT_TABLE_PREFIX,
    DEFAULT_VISIBILITY_TIMEOUT,
    LISTEN_WAIT_MAX,
    PgListener,
    Tables,
    sqlalchemy_url,
    translate_errors,
)

__all__ = ["SQLTransport"]

logger = logging.getLogger(__name__)

# While the prefetch bound is reached, poll() waits this long at most so the
# caller's loop can settle messages instead of blocking for its whole timeout.
_FULL_WAIT = 0.05


class SQLTransport(Transport):
    """A transport on a SQL database (see the module docstring)."""

    schemes: ClassVar[tuple[str, ...]] = ("sqlite", "sqla")
    supports_delay: ClassVar[bool] = True
    #: A held row carries this transport's token; the claim outlives connections.
    keeps_deliveries: ClassVar[bool] = True
    supports_fanout: ClassVar[bool] = True

    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(url, options)
        self._sa_url = sqlalchemy_url(url)
        opts = self.options
        self._tables = Tables(str(opts.get("table_prefix", DEFAULT_TABLE_PREFIX)))
        self.visibility_timeout = float(opts.get("visibility_timeout", DEFAULT_VISIBILITY_TIMEOUT))
        self._interval_min = float(opts.get("polling_interval", DEFAULT_POLLING_INTERVAL))
        self._interval_max = float(opts.get("polling_interval_max", DEFAULT_POLLING_INTERVAL_MAX))
        self._interval = self._interval_min
        self._max_batch = int(opts.get("max_batch", DEFAULT_MAX_BATCH))
        self._connect_timeout = float(opts.get("connect_timeout", 4.0))
        self._db = Database(self._sa_url, self._tables, self.options, self._connect_timeout,
                            repr(self))
        self._claims = Claims(self._db, self._tables, self.visibility_timeout, repr(self))
        self._listener: PgListener | None = None
        self._consumed: dict[str, Queue] = {}
        self._prefetch = 0

    def __repr__(self) -> str:
        return f"<SQLTransport {self._sa_url.render_as_string(hide_password=True)}>"

    @property
    def token(self) -> str:
        """Our claim token: rows we hold carry it, so ack/maintain/close touch only ours."""
        return self._claims.token

    # -- connection -------------------------------------------------------------------

    def connect(self) -> None:
        if self._db.engine is not None:
            return
        self._db.open()
        try:  # after drop(): the rows we held still carry our token (keeps_deliveries)
            self._claims.resume()
        except TransportError as exc:
            self._db.close()
            raise BrokerConnectionError(f"{self!r}: settling after reconnecting: {exc}") from exc

    def close(self) -> None:
        if self._db.engine is None:
            self._claims.abandon()  # dropped and never connected again
            return
        self._claims.release_all()
        self.drop()

    def drop(self) -> None:
        """Let the database connections go, keeping the claims (``connect()`` resumes them)."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._db.close()

    @property
    def connected(self) -> bool:
        return self._db.engine is not None

    # -- topology -------------------------------------------------------------------------

    def declare(self, queue: Queue) -> None:
        exchange = queue.bound_exchange
        self._db.require()
        if not exchange.name:
            return  # queues are implicit: a row names its queue
        check_exchange_type(exchange.type)
        bindings = self._tables.bindings
        row = {
            "exchange": exchange.name,
            "exchange_type": exchange.type,
            "routing_key": queue.bound_routing_key,
            "queue": queue.name,
        }
        match = sa.and_(*(bindings.c[key] == value for key, value in row.items()))

        def bind(conn: sa.Connection) -> None:
            if conn.execute(sa.select(sa.literal(1)).where(match)).first() is None:
                conn.execute(sa.insert(bindings).values(**row))

        try:
            self._db.run(f"declaring {queue.name!r}", bind)
        except TransportError as exc:
            # Another process may have inserted the same binding between our check
            # and our insert: fine if it is there now.
            if not isinstance(exc.__cause__, sa.exc.IntegrityError):
                raise

    def declare_exchange(self, exchange: Exchange) -> None:
        if exchange.name:
            check_exchange_type(exchange.type)

    # -- publishing -------------------------------------------------------------------------

    def publish(
        self,
        envelope: Envelope,
        *,
        exchange: str,
        routing_key: str,
        delay: float | None = None,
    ) -> None:
        now = time.time()
        row = {
            "priority": int(envelope.properties.get("priority") or 0),
            "due_at": now + max(0.0, delay or 0.0),
            "delivery_count": 0,
            "body": envelope.body,
            "content_type": envelope.content_type,
            "content_encoding": envelope.content_encoding,
            "headers": json_dumps(envelope.headers),
            "properties": json_dumps(envelope.properties),
            "exchange": exchange,
            "routing_key": routing_key,
            "created_at": now,
        }
        where = f"{exchange!r}/{routing_key!r}"

        def insert(conn: sa.Connection) -> None:
            targets = self._route(conn, exchange, routing_key)
            if not targets:
                logger.warning("%r: no queue bound for %s; message dropped", self, where)
                return
            conn.execute(sa.insert(self._tables.messages), [{**row, "queue": q} for q in targets])
            self._db.notify(conn)

        self._db.run(f"publishing to {where}", insert)

    def _route(self, conn: sa.Connection, exchange: str, routing_key: str) -> list[str]:
        if not exchange:
            return [routing_key]
        table = self._tables.bindings
        rows = conn.execute(
            sa.select(table.c.exchange_type, table.c.routing_key, table.c.queue)
            .where(table.c.exchange == exchange)
            .order_by(table.c.queue)
        )
        bindings = [Binding(exchange, r.exchange_type, r.routing_key, r.queue) for r in rows]
        return route(bindings, routing_key)

    # -- consuming ----------------------------------------------------------------------------

    def consume(self, queues: Sequence[Queue], *, prefetch_count: int = 0) -> None:
        for queue in queues:
            self.declare(queue)
            self._consumed[queue.name] = queue
        self._prefetch = prefetch_count

    def cancel(self, queue_name: str) -> None:
        self._consumed.pop(queue_name, None)

    def set_prefetch(self, prefetch_count: int) -> None:
        self._prefetch = prefetch_count

    def poll(self, timeout: float | None = None) -> list[Message]:
        engine = self._db.require()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            with translate_errors("polling"):
                # Only consumers need the LISTEN connection: open it on the first poll.
                if self._listener is None and engine.url.drivername == "postgresql+psycopg":
                    self._listener = PgListener(engine, self._tables.channel, self._connect_timeout)
                return self._poll_until(deadline)
        except BrokerConnectionError:
            # The LISTEN connection may be what broke: the next poll opens a fresh one.
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            raise

    def _poll_until(self, deadline: float | None) -> list[Message]:
        while True:
            room = (self._max_batch if self._prefetch <= 0
                    else self._prefetch - len(self._claims.held))
            if room > 0 and self._consumed:
                if self._listener is not None:
                    self._listener.drain()
                messages = self._claim(room)
                if messages:
                    self._interval = self._interval_min
                    return messages
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return []
            if room <= 0 or not self._consumed:
                time.sleep(_FULL_WAIT if remaining is None else min(remaining, _FULL_WAIT))
                return []
            self._wait(remaining)

    def _wait(self, remaining: float | None) -> None:
        """Sleep until something may be claimable, at most ``remaining`` seconds."""
        limit = LISTEN_WAIT_MAX if self._listener is not None else self._interval
        if remaining is not None:
            limit = min(limit, remaining)
        next_due = self._db.run("looking for delayed messages", self._next_due)
        if next_due is not None:
            limit = max(0.0, min(limit, next_due - time.time()))
        if self._listener is not None:
            self._listener.wait(limit)
        else:
            time.sleep(limit)
            self._interval = min(self._interval * 2, self._interval_max)

    def _claim(self, limit: int) -> list[Message]:
        rows, extra_deliveries = self._claims.claim(list(self._consumed), limit)
        held = self._claims.held
        messages = []
        for row in rows:
            held.add(row.id)
            messages.append(self._to_message(row, extra_deliveries))
        return messages

    def _to_message(self, row: sa.Row[Any], extra_deliveries: int) -> Message:
        delivery_count = row.delivery_count + extra_deliveries
        return Message(
            self,
            body=bytes(row.body),
            delivery_tag=row.id,
            content_type=row.content_type,
            content_encoding=row.content_encoding,
            headers=json_loads(row.headers),
            properties=json_loads(row.properties),
            delivery_info={
                "exchange": row.exchange,
                "routing_key": row.routing_key,
                "priority": row.priority,
                "redelivered": delivery_count > 1,
                "queue": row.queue,
                "delivery_count": row.failed_deliveries + 1 + int(
                    bool(extra_deliveries) and row.claim is not None),  # read before the claim
            },
        )

    def _next_due(self, conn: sa.Connection) -> float | None:
        messages = self._tables.messages
        query = sa.select(sa.func.min(messages.c.due_at)).where(
            messages.c.queue.in_(list(self._consumed)),
            messages.c.due_at > time.time(),
            messages.c.claim.is_(None),
        )
        due = conn.execute(query).scalar()
        return None if due is None else float(due)

    def ack(self, message: Message) -> None:
        self._claims.settle(message.delivery_tag, delete=True, action="ack")

    def ack_many(self, messages: Sequence[Message]) -> None:
        """Delete several held messages in one statement (one commit)."""
        if len(messages) == 1:
            messages[0].ack()
            return
        self._claims.ack_many(messages)

    def ack_early(self, messages: Sequence[Message]) -> None:
        """Delete the rows now (one commit); a database that is down raises."""
        self._claims.ack_many(messages, now=True)

    def reject(self, message: Message, *, requeue: bool) -> None:
        self._claims.settle(message.delivery_tag, delete=not requeue,
                            action="requeue" if requeue else "reject")

    def requeue_failed(self, message: Message) -> None:
        self._claims.settle(message.delivery_tag, delete=False, action="requeue",
                            release=self._claims.released(failed=True))

    def dead_letter(self, message: Message) -> str | None:
        queue = str(message.delivery_info.get("queue"))
        self._claims.settle(message.delivery_tag, delete=False, action="dead-letter",
                            release=self._claims.released(dead=queue))
        return dead_letter_queue(queue)

    def maintain(self) -> None:
        """Refresh the claims of every held message (call at least every visibility_timeout/4).

        Calls closer together than a tenth of the visibility timeout are skipped:
        the claims are still fresh.
        """
        self._claims.refresh()

    # -- administration ---------------------------------------------------------------------

    def purge(self, queue_name: str) -> int:
        ready = claimable(self._tables.messages, [queue_name], time.time())
        purge = sa.delete(self._tables.messages).where(ready)
        return self._db.run(f"purging {queue_name!r}",
                            lambda conn: int(conn.execute(purge).rowcount))

    def queue_size(self, queue_name: str) -> int:
        query = sa.select(sa.func.count()).select_from(self._tables.messages)
        query = query.where(claimable(self._tables.messages, [queue_name], time.time()))
        return self._db.run(
            f"counting {queue_name!r}", lambda conn: int(conn.execute(query).scalar() or 0)
        )
