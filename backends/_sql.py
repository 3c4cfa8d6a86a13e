"""SQL plumbing for ``DatabaseBackend``: URLs, engines, the tables, the counter and revoke
statements.

Kept apart from ``database.py`` so the backend reads as its operations only.
Table and column layout are Celery 5.7's (../shared/spec/celery-wire.md §6.4,
celery-internals.md §7.2) so Celery and taskframe share one result store.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.pool import StaticPool

from taskframe.errors import ImproperlyConfigured

__all__ = [
    "SQLITE_BEGIN",
    "SQLITE_BUSY_TIMEOUT",
    "Tables",
    "add_missing_columns",
    "counter_incr",
    "create_engine",
    "is_memory_sqlite",
    "make_tables",
    "revokes_upsert",
    "sqlalchemy_url",
]

#: Seconds a SQLite writer waits for another process's write lock.
SQLITE_BUSY_TIMEOUT = 30.0

# The client each bare database name gets: psycopg 3 and PyMySQL are our extras.
_DEFAULT_DRIVERS = {
    "postgresql": "postgresql+psycopg",
    "postgres": "postgresql+psycopg",
    "mysql": "mysql+pymysql",
    "mariadb": "mariadb+pymysql",
}

_MYSQL = ("mysql", "mariadb")
# MySQL's BLOB/TEXT stop at 64 KiB: results bigger than that are common.
_BLOB = sa.LargeBinary().with_variant(mysql.LONGBLOB(), *_MYSQL)
_TEXT = sa.Text().with_variant(mysql.LONGTEXT(), *_MYSQL)
# Plain DATETIME on MySQL drops microseconds.
_DATETIME = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), *_MYSQL)

#: SQLite execution option: "IMMEDIATE" takes the write lock at BEGIN.
SQLITE_BEGIN = "taskframe_sqlite_begin"


def sqlalchemy_url(url: str) -> URL:
    """Turn ``db+<url>`` or ``sqlite:///...`` into a SQLAlchemy URL with our drivers.

    Raises:
        ImproperlyConfigured: the URL cannot be parsed.
    """
    raw = url[3:] if url.startswith("db+") else url
    scheme, sep, rest = raw.partition("://")
    if not sep:
        raise ImproperlyConfigured(f"result backend URL {url!r} has no '://'")
    raw = f"{_DEFAULT_DRIVERS.get(scheme, scheme)}://{rest}"
    try:
        return make_url(raw)
    except (sa.exc.ArgumentError, ValueError) as exc:
        raise ImproperlyConfigured(f"bad database result backend URL {url!r}: {exc}") from exc


def is_memory_sqlite(url: URL) -> bool:
    """True for an in-memory SQLite URL (one shared connection, never pooled away)."""
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def create_engine(url: URL, engine_options: Mapping[str, Any]) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout and explicit BEGINs.

    Raises:
        ImproperlyConfigured: the driver is not installed or an option is wrong.
    """
    options: dict[str, Any] = {}
    is_sqlite = url.get_backend_name() == "sqlite"
    if is_sqlite:
        options["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT, "check_same_thread": False}
        if is_memory_sqlite(url):
            # One shared connection, else every checkout sees a new empty database.
            options["poolclass"] = StaticPool
    else:
        options.update(pool_pre_ping=True, pool_recycle=3600)
    options.update(engine_options)
    try:
        engine = sa.create_engine(url, **options)
    except (ImportError, sa.exc.ArgumentError, TypeError) as exc:
        raise ImproperlyConfigured(
            f"cannot create a database engine for {url.render_as_string()}: {exc}"
        ) from exc
    if is_sqlite:
        _configure_sqlite(engine, memory=is_memory_sqlite(url))
    return engine


def _configure_sqlite(engine: Engine, *, memory: bool) -> None:
    # pysqlite issues BEGIN lazily and never BEGIN IMMEDIATE; take over, as the
    # SQLAlchemy docs recommend, so a read-then-write holds the write lock from
    # its first statement and two processes cannot both see "not SUCCESS yet".
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT * 1000)}")
            if not memory:
                cursor.execute("PRAGMA journal_mode = WAL")
                cursor.execute("PRAGMA synchronous = NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get(SQLITE_BEGIN, "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


@dataclass(frozen=True)
class Tables:
    """The tables of one backend."""

    metadata: sa.MetaData
    task: sa.Table
    group: sa.Table
    counter: sa.Table
    revoked: sa.Table


def make_tables(names: Mapping[str, str]) -> Tables:
    """Celery's ``celery_taskmeta``/``celery_tasksetmeta`` plus our counter and revoked tables.

    ``names`` is ``database_table_names``: keys ``task``, ``group`` and (ours)
    ``counter`` and ``revoked``. The sequence names are Celery's whatever the table names, as
    Celery's models use them.
    """
    metadata = sa.MetaData()
    task = sa.Table(
        names.get("task", "celery_taskmeta"), metadata,
        sa.Column("id", sa.Integer, sa.Sequence("task_id_sequence"), primary_key=True,
                  autoincrement=True),
        sa.Column("task_id", sa.String(155), unique=True),
        sa.Column("status", sa.String(50)),
        sa.Column("result", _BLOB, nullable=True),
        sa.Column("date_done", _DATETIME, nullable=True, index=True),
        sa.Column("traceback", _TEXT, nullable=True),
        sa.Column("children", _BLOB, nullable=True),
        # result_extended columns (Celery's TaskExtended); always present, filled
        # only when extended results are on.
        sa.Column("name", sa.String(155), nullable=True),
        sa.Column("args", _BLOB, nullable=True),
        sa.Column("kwargs", _BLOB, nullable=True),
        sa.Column("worker", sa.String(155), nullable=True),
        sa.Column("retries", sa.Integer, nullable=True),
        sa.Column("queue", sa.String(155), nullable=True),
        sa.Column("stamps", _BLOB, nullable=True),
        sqlite_autoincrement=True,
    )
    group = sa.Table(
        names.get("group", "celery_tasksetmeta"), metadata,
        sa.Column("id", sa.Integer, sa.Sequence("taskset_id_sequence"), primary_key=True,
                  autoincrement=True),
        sa.Column("taskset_id", sa.String(155), unique=True),
        sa.Column("result", _BLOB, nullable=True),
        sa.Column("date_done", _DATETIME, nullable=True, index=True),
        sqlite_autoincrement=True,
    )
    counter = sa.Table(
        names.get("counter", "taskframe_counters"), metadata,
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("value", sa.BigInteger, nullable=False),
    )
    revoked = sa.Table(
        names.get("revoked", "taskframe_revoked"), metadata,
        sa.Column("task_id", sa.String(255), primary_key=True),
        sa.Column("expires_at", sa.Double, nullable=False),  # unix seconds
    )
    return Tables(metadata, task, group, counter, revoked)


def add_missing_columns(conn: Connection, table: sa.Table) -> list[str]:
    """``ALTER TABLE ADD COLUMN`` for nullable columns an older table lacks.

    A table created by Celery 5.5/5.6, or without ``result_extended``, lacks
    ``children``/``name``/``args``/...; Celery 5.7 adds them the same way.
    """
    present = {col["name"] for col in sa.inspect(conn).get_columns(table.name)}
    added = []
    preparer = conn.dialect.identifier_preparer
    for column in table.columns:
        if column.name in present or not column.nullable:
            continue
        col_type = column.type.compile(dialect=conn.dialect)
        conn.exec_driver_sql(
            f"ALTER TABLE {preparer.format_table(table)} "
            f"ADD COLUMN {preparer.format_column(column)} {col_type}"
        )
        added.append(column.name)
    return added


def counter_incr(conn: Connection, table: sa.Table, key: str) -> int:
    """Add one to counter ``key`` (created at 1) in ONE statement; return the new value.

    SQLite and PostgreSQL: ``INSERT ... ON CONFLICT DO UPDATE ... RETURNING``.
    MySQL/MariaDB: ``INSERT ... ON DUPLICATE KEY UPDATE value = LAST_INSERT_ID(value + 1)``
    then ``SELECT LAST_INSERT_ID()``, which is per connection, so no other
    client's increment can show through. Other databases: an ``UPDATE`` (which
    locks the row) then a read in the same transaction.
    """
    key_col, value_col = table.c["key"], table.c["value"]
    dialect = conn.dialect.name
    if dialect in ("sqlite", "postgresql"):
        module: Any = sqlite if dialect == "sqlite" else postgresql
        stmt = (
            module.insert(table)
            .values({key_col: key, value_col: 1})
            .on_conflict_do_update(index_elements=[key_col], set_={value_col: value_col + 1})
            .returning(value_col)
        )
        return int(conn.execute(stmt).scalar_one())
    if dialect in _MYSQL:
        # LAST_INSERT_ID(1) on the insert path too: without it a fresh row
        # would leave LAST_INSERT_ID() at whatever this connection saw before.
        ins = mysql.insert(table).values({key_col: key, value_col: sa.func.last_insert_id(1)})
        stmt = ins.on_duplicate_key_update({value_col: sa.func.last_insert_id(value_col + 1)})
        conn.execute(stmt)
        return int(conn.execute(sa.select(sa.func.last_insert_id())).scalar_one())
    updated = conn.execute(
        sa.update(table).where(key_col == key).values({value_col: value_col + 1})
    )
    if updated.rowcount == 0:
        conn.execute(sa.insert(table).values({key_col: key, value_col: 1}))
    return int(conn.execute(sa.select(value_col).where(key_col == key)).scalar_one())



def revokes_upsert(conn: Connection, table: sa.Table, entries: Mapping[str, float]) -> None:
    """Insert revoked ids, or raise the expiry of ids already there, in ONE statement.

    Each row is written atomically by the database, so concurrent revokers never lose
    one another's ids. SQLite and PostgreSQL: ``INSERT ... ON CONFLICT DO UPDATE``;
    MySQL/MariaDB: ``INSERT ... ON DUPLICATE KEY UPDATE``; the later expiry wins. Rows
    go in task id order, so two writers lock shared ids in the same order. Other
    databases: an ``UPDATE`` then an ``INSERT`` per id.
    """
    rows = [{"task_id": task_id, "expires_at": float(entries[task_id])}
            for task_id in sorted(entries)]
    if not rows:
        return
    col = table.c["expires_at"]
    dialect = conn.dialect.name
    if dialect in ("sqlite", "postgresql"):
        module: Any = sqlite if dialect == "sqlite" else postgresql
        ins = module.insert(table).values(rows)
        later = sa.case((ins.excluded.expires_at > col, ins.excluded.expires_at), else_=col)
        conn.execute(ins.on_conflict_do_update(index_elements=[table.c["task_id"]],
                                               set_={col: later}))
        return
    if dialect in _MYSQL:
        my = mysql.insert(table).values(rows)
        conn.execute(my.on_duplicate_key_update(
            {col: sa.func.greatest(col, my.inserted.expires_at)}))
        return
    for row in rows:
        where = table.c["task_id"] == row["task_id"]
        if conn.execute(sa.select(col).where(where)).first() is None:
            conn.execute(sa.insert(table).values(row))
        else:
            conn.execute(sa.update(table).where(where, col < row["expires_at"])
                         .values(expires_at=row["expires_at"]))
