"""Tables, engines and error translation for the SQL transport (see ``sql.py``).

Kept apart from the transport logic so that ``sql.py`` reads as the queue
algorithm only: here are the names, the schema, the per-dialect engine set-up
(SQLite WAL and ``BEGIN IMMEDIATE``; psycopg 3 for PostgreSQL), the
PostgreSQL LISTEN connection and the one place where SQLAlchemy and DB-API
exceptions become transport errors.
"""

from __future__ import annotations

import contextlib
import logging
import os
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import mysql

from .errors import (
    BrokerConnectionError,
    ConnectionLost,
    ImproperlyConfigured,
    TransportError,
)

__all__ = [
    "DEFAULT_TABLE_PREFIX",
    "PgListener",
    "Tables",
    "build_engine",
    "create_tables",
    "is_transient",
    "sqlalchemy_url",
    "translate_errors",
]

logger = logging.getLogger(__name__)

# -- names and defaults: the one constants block of the SQL transport ------------------
DEFAULT_TABLE_PREFIX = "taskframe_"
MESSAGES_TABLE = "messages"  # full name: prefix + this
BINDINGS_TABLE = "bindings"
NOTIFY_CHANNEL = "messages"  # PostgreSQL NOTIFY channel: prefix + this
DEFAULT_VISIBILITY_TIMEOUT = 60.0
DEFAULT_POLLING_INTERVAL = 0.05
DEFAULT_POLLING_INTERVAL_MAX = 0.5
DEFAULT_BUSY_TIMEOUT = 30.0  # SQLite: how long a writer waits for the file lock
DEFAULT_MAX_BATCH = 100  # most rows one poll claims when there is no prefetch bound
LISTEN_WAIT_MAX = 2.0  # PostgreSQL: re-check for expired claims at least this often

# Large payloads: MySQL/MariaDB's plain BLOB and TEXT stop at 64 KiB.
_BODY_TYPE = sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")
_TEXT_TYPE = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
_ID_TYPE = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


class Tables:
    """The transport's two tables under one prefix.

    Attributes:
        messages: one row per message per queue.
        bindings: exchange -> queue bindings for routed publishing.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.metadata = sa.MetaData()
        self.messages = sa.Table(
            prefix + MESSAGES_TABLE,
            self.metadata,
            sa.Column("id", _ID_TYPE, primary_key=True, autoincrement=True),
            sa.Column("queue", sa.String(255), nullable=False),
            sa.Column("priority", sa.Integer, nullable=False, default=0),
            sa.Column("due_at", sa.Double, nullable=False),
            sa.Column("claim", sa.String(32), nullable=True),
            sa.Column("claimed_until", sa.Double, nullable=True),
            sa.Column("delivery_count", sa.Integer, nullable=False, default=0),
            # Newer than the table: an older table gets it at open (ADDED_COLUMNS).
            sa.Column("failed_deliveries", sa.Integer, nullable=False, default=0,
                      server_default="0"),
            sa.Column("body", _BODY_TYPE, nullable=False),
            sa.Column("content_type", sa.String(128), nullable=False),
            sa.Column("content_encoding", sa.String(64), nullable=False),
            sa.Column("headers", _TEXT_TYPE, nullable=False),
            sa.Column("properties", _TEXT_TYPE, nullable=False),
            sa.Column("exchange", sa.String(255), nullable=False),
            sa.Column("routing_key", sa.String(255), nullable=False),
            sa.Column("created_at", sa.Double, nullable=False),
            # The claim query filters by queue and orders by priority DESC, due_at, id:
            # the index has that exact order so the database walks it and stops at the
            # LIMIT instead of sorting the whole queue (measured: 8.6 ms per claim on
            # SQLite with 4,000 waiting messages with an ascending priority column).
            sa.Index(f"{prefix}messages_ready_idx", "queue", sa.text("priority DESC"),
                     "due_at", "id"),
            # ack, maintain and close look rows up by our claim token.
            sa.Index(f"{prefix}messages_claim_idx", "claim"),
            # Never reuse an id on SQLite: a late ack must not hit a newer message.
            sqlite_autoincrement=True,
        )
        self.bindings = sa.Table(
            prefix + BINDINGS_TABLE,
            self.metadata,
            sa.Column("exchange", sa.String(255), nullable=False),
            sa.Column("exchange_type", sa.String(16), nullable=False),
            sa.Column("routing_key", sa.String(255), nullable=False),
            sa.Column("queue", sa.String(255), nullable=False),
            sa.PrimaryKeyConstraint("exchange", "routing_key", "queue"),
        )

    @property
    def channel(self) -> str:
        """The PostgreSQL NOTIFY channel publishers signal on."""
        return self.prefix + NOTIFY_CHANNEL


def sqlalchemy_url(broker_url: str) -> sa.URL:
    """The SQLAlchemy URL behind a broker URL.

    ``sqlite:///path`` is used as is; ``sqla+X`` becomes ``X``, with plain
    ``postgresql://`` mapped to the psycopg 3 driver.

    Raises:
        ImproperlyConfigured: not a SQL URL, or an in-memory SQLite database
            (each connection would see its own empty database).
    """
    inner = broker_url
    if broker_url.lower().startswith("sqla+"):
        inner = broker_url[len("sqla+") :]
    try:
        url = sa.make_url(inner)
    except sa_exc.ArgumentError as exc:
        raise ImproperlyConfigured(f"not a SQLAlchemy URL: {exc}") from exc
    # Plain names get the drivers taskframe installs (psycopg 3, PyMySQL), not
    # SQLAlchemy's historical defaults (psycopg2, mysqlclient).
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    elif url.drivername in ("mysql", "mariadb"):
        url = url.set(drivername=f"{url.drivername}+pymysql")
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        raise ImproperlyConfigured(
            "the SQL transport needs a SQLite file (sqlite:///path/file.sqlite3); "
            "use memory:// for an in-process broker"
        )
    return url


def build_engine(url: sa.URL, options: Mapping[str, Any]) -> sa.Engine:
    """An engine set up for queue work on ``url``'s dialect."""
    connect_args: dict[str, Any] = {}
    backend = url.get_backend_name()
    if backend == "sqlite":
        connect_args["timeout"] = float(options.get("busy_timeout", DEFAULT_BUSY_TIMEOUT))
        # One thread at a time uses a transport, but not always the same thread.
        connect_args["check_same_thread"] = False
        assert url.database is not None  # sqlalchemy_url() refused the rest
        directory = os.path.dirname(os.path.abspath(url.database))
        os.makedirs(directory, exist_ok=True)
    elif url.drivername == "postgresql+psycopg":
        # libpq refuses connect_timeout below 2 seconds.
        connect_args["connect_timeout"] = max(2, round(options.get("connect_timeout", 4.0)))
    elif backend in ("mysql", "mariadb"):
        connect_args["connect_timeout"] = max(1, round(options.get("connect_timeout", 4.0)))
    engine = sa.create_engine(url, connect_args=connect_args, pool_size=2, max_overflow=4)
    if backend == "sqlite":
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
    return engine


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Take transaction control from the sqlite3 module so that _sqlite_on_begin
    # can start every transaction with BEGIN IMMEDIATE.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        # WAL: readers never block the writer; several processes share one file.
        cursor.execute("PRAGMA journal_mode=WAL")
        # NORMAL is durable across process crashes in WAL mode (power loss may drop
        # the last commits), and much faster than FULL.
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def _sqlite_on_begin(connection: sa.Connection) -> None:
    # Every transaction here writes (claims, acks, publishes). Taking the write lock
    # up front makes the busy timeout apply instead of failing a read-to-write
    # upgrade with SQLITE_BUSY when another process wrote in between.
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def create_tables(engine: sa.Engine, tables: Tables) -> None:
    """Create the tables, indexes and columns that are missing (safe against concurrent
    callers)."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            # Two processes creating the same table race on the catalog; serialize them.
            key = zlib.crc32(tables.prefix.encode("utf-8")) & 0x7FFFFFFF
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(key)))
        tables.metadata.create_all(conn, checkfirst=True)
    _add_columns(engine, tables.messages)


#: Columns of the messages table newer than the table itself: name -> DDL of its type.
ADDED_COLUMNS = {"failed_deliveries": "INTEGER DEFAULT 0 NOT NULL"}


def _add_columns(engine: sa.Engine, table: sa.Table) -> None:
    """Add the ``ADDED_COLUMNS`` an older table lacks (its other workers go on as before)."""
    missing = [name for name in ADDED_COLUMNS if name not in _columns(engine, table)]
    for name in missing:
        quoted = engine.dialect.identifier_preparer.quote(table.name)
        try:
            with engine.begin() as conn:
                conn.execute(sa.text(f"ALTER TABLE {quoted} ADD COLUMN {name} "
                                     f"{ADDED_COLUMNS[name]}"))
        except sa_exc.DBAPIError:
            if name not in _columns(engine, table):  # else another process added it first
                raise


def _columns(engine: sa.Engine, table: sa.Table) -> set[str]:
    with engine.connect() as conn:
        return {column["name"] for column in sa.inspect(conn).get_columns(table.name)}


@contextlib.contextmanager
def translate_errors(action: str, *, connecting: bool = False) -> Iterator[None]:
    """Turn SQLAlchemy and DB-API exceptions into transport errors.

    Args:
        action: what was being done, for the message.
        connecting: failures mean the broker is unreachable (``BrokerConnectionError``)
            rather than a lost link (``ConnectionLost``).
    """
    lost = BrokerConnectionError if connecting else ConnectionLost
    try:
        yield
    except TransportError:
        raise
    except (
        sa_exc.OperationalError,
        sa_exc.InterfaceError,
        sa_exc.DisconnectionError,
        sa_exc.TimeoutError,
    ) as exc:
        raise lost(f"{action}: {_describe(exc)}") from exc
    except sa_exc.SQLAlchemyError as exc:
        raise TransportError(f"{action}: {_describe(exc)}") from exc
    except (OSError, _psycopg_error()) as exc:
        raise lost(f"{action}: {exc}") from exc


# Errors that mean "run the transaction again": PostgreSQL deadlock and
# serialization failure (SQLSTATE), MySQL/MariaDB deadlock and lock wait timeout.
_TRANSIENT_SQLSTATES = frozenset({"40P01", "40001"})
_TRANSIENT_MYSQL_CODES = frozenset({1213, 1205})


def is_transient(exc: sa_exc.DBAPIError) -> bool:
    """True when ``exc`` is a deadlock or serialization failure worth retrying."""
    orig = exc.orig
    if getattr(orig, "sqlstate", None) in _TRANSIENT_SQLSTATES:
        return True
    args: tuple[Any, ...] = getattr(orig, "args", ())
    return bool(args) and args[0] in _TRANSIENT_MYSQL_CODES


def _describe(exc: sa_exc.SQLAlchemyError) -> str:
    orig = getattr(exc, "orig", None)
    return str(orig if orig is not None else exc).strip()


def _psycopg_error() -> type[Exception]:
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg is only needed for PostgreSQL
        return OSError
    return psycopg.Error


class PgListener:
    """A dedicated psycopg connection LISTENing on the transport's channel.

    Publishers ``NOTIFY`` the channel in the same transaction as their insert, so
    a waiting consumer wakes as soon as the message is committed.
    """

    def __init__(self, engine: sa.Engine, channel: str, connect_timeout: float) -> None:
        import psycopg
        from psycopg import sql

        args, kwargs = engine.dialect.create_connect_args(engine.url)
        kwargs["connect_timeout"] = max(2, round(connect_timeout))
        self._conn = psycopg.connect(*args, autocommit=True, **kwargs)
        self._conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))

    def drain(self) -> None:
        """Forget notifications already received (a claim attempt follows)."""
        with contextlib.closing(self._conn.notifies(timeout=0)) as notes:
            for _ in notes:
                pass

    def wait(self, seconds: float) -> bool:
        """Block on the connection's socket until a notification or ``seconds`` pass.

        Returns:
            True when woken by a notification.
        """
        # Close the generator at once: it holds the connection's lock while open.
        with contextlib.closing(self._conn.notifies(timeout=max(0.0, seconds))) as notes:
            return next(notes, None) is not None

    def close(self) -> None:
        """Close the connection; errors are ignored (it may be dead already)."""
        with contextlib.suppress(Exception):
            self._conn.close()
