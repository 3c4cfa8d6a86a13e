"""SQL result backend on SQLAlchemy 2, sharing Celery's tables (``db+...``).

Features:

* Celery 5.7's tables and encoding: ``celery_taskmeta`` (with ``children`` and
  the ``result_extended`` columns) and ``celery_tasksetmeta``; ``result``,
  ``children``, ``args``, ``kwargs`` and group results are bytes in
  ``result_serializer``. Celery and taskframe read each other's rows. Legacy
  (Celery 5.5/5.6 ``PickleType``) rows are unpickled only when ``pickle`` is in
  ``result_accept_content``. Tables are created at setup (or on first use) and
  nullable columns an older table lacks are added.
* A stored SUCCESS is never overwritten: read, lock the row (``SELECT ... FOR
  UPDATE``; on SQLite the transaction starts with ``BEGIN IMMEDIATE``), write, in
  one transaction.
* ``get_task_metas``: one ``SELECT ... WHERE task_id IN (...)``.
* ``incr``: atomic counters in ``taskframe_counters`` with one statement.
* Revoked ids: rows of ``taskframe_revoked`` (task id, expiry), each written by one
  upsert; the counter ``taskframe.revoked`` counts the adds (``revokes_version``).
* SQLite: WAL and a busy timeout, so several processes can share one file.
* Transient errors (``OperationalError``, ``InterfaceError``) are retried 3 times
  with backoff after the engine is disposed; every SQLAlchemy error that still
  escapes becomes ``taskframe.errors.BackendError``.

URLs: ``db+<SQLAlchemy URL>``, e.g. ``db+sqlite:///results.sqlite3``,
``db+postgresql://user@host/db`` (psycopg 3 is used when no driver is named),
``db+mysql://root@host/db`` (PyMySQL when no driver is named); plain
``sqlite:///path`` is a shortcut for ``db+sqlite:///path``.

Options (``BackendOptions``): ``serializer``, ``accept``, ``expires`` and
``failure_expires`` (for ``cleanup``), ``extended``, ``table_names`` (``task``,
``group`` and our ``counter`` and ``revoked``), ``engine_options`` (passed to ``create_engine``),
``create_tables_at_setup``, ``short_lived_sessions`` (no connection pool: every
call opens and closes its own connection).
"""

from __future__ import annotations

import os
import pickle
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, ClassVar, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, Row
from sqlalchemy.pool import NullPool

from taskframe import states
from taskframe.backends import _sql
from taskframe.backends._codec import ResultCodec
from taskframe.backends.base import Backend, BackendOptions
from taskframe.errors import BackendError, ContentDisallowed, DecodeError
from taskframe.protocol.results import ResultContext, ResultMeta, make_meta

__all__ = ["DatabaseBackend"]

T = TypeVar("T")

#: Retries after the first attempt, for transient errors.
MAX_RETRIES = 3
#: Task ids per ``SELECT ... IN`` of ``get_task_metas`` (bound-parameter limits).
IN_BATCH = 500
#: The counter row that changes whenever revoked ids are added.
REVOKES_COUNTER = "taskframe.revoked"
_TRANSIENT = (sa.exc.OperationalError, sa.exc.InterfaceError)
_EXTENDED = ("name", "worker", "retries", "queue")


def _naive_utc(iso: str | None) -> datetime | None:
    # Celery's date_done column is a naive DATETIME holding UTC.
    if not iso:
        return None
    return datetime.fromisoformat(iso).astimezone(UTC).replace(tzinfo=None)


def _aware_iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()


class DatabaseBackend(Backend):
    """Results in SQL tables shared with Celery's ``DatabaseBackend``."""

    schemes: ClassVar[tuple[str, ...]] = ("db", "sqlite")

    def __init__(self, url: str, options: BackendOptions | None = None) -> None:
        super().__init__(url, options)
        self._sa_url = _sql.sqlalchemy_url(url)
        self._codec = ResultCodec(self.options.serializer, self.options.accept,
                                  self.options.max_message_size)
        self._tables = _sql.make_tables(self.options.table_names)
        self._lock = threading.Lock()
        self._engine: Engine | None = None
        self._pid = os.getpid()
        self._tables_ready = False
        if self.options.create_tables_at_setup:
            self.create_tables()

    # -- plumbing -----------------------------------------------------------------------

    def _get_engine(self) -> Engine:
        with self._lock:
            if self._engine is None:
                options = dict(self.options.engine_options)
                if self.options.short_lived_sessions and not _sql.is_memory_sqlite(self._sa_url):
                    # database_short_lived_sessions: no pool, so each call opens its
                    # own connection and closes it when done (nothing held between
                    # calls, as Celery's NullPool engines do).
                    options.setdefault("poolclass", NullPool)
                self._engine = _sql.create_engine(self._sa_url, options)
            elif self._pid != os.getpid():
                # Forked: the parent's pooled connections must not be used here.
                self._engine.dispose(close=False)
            self._pid = os.getpid()
            return self._engine

    def _dispose(self) -> None:
        with self._lock:
            if self._engine is not None:
                self._engine.dispose()

    def _run(self, what: str, fn: Callable[[Connection], T], *, write: bool,
             setup: bool = False) -> T:
        """Run ``fn`` in one transaction; retry transient errors; translate the rest."""
        if not setup and not self._tables_ready:
            self.create_tables()
        attempt = 0
        while True:
            try:
                with self._get_engine().connect() as conn:
                    if write:
                        conn = conn.execution_options(**{_sql.SQLITE_BEGIN: "IMMEDIATE"})
                    with conn.begin():
                        return fn(conn)
            except _TRANSIENT as exc:
                if attempt >= MAX_RETRIES:
                    raise BackendError(
                        f"{what} failed after {attempt + 1} attempts: {exc.orig or exc}"
                    ) from exc
                # A dropped server connection poisons the pool; SQLite "database is
                # locked" does not, and its file handles are cheap to keep.
                if self._sa_url.get_backend_name() != "sqlite":
                    self._dispose()
                time.sleep(min(0.05 * 4**attempt, 2.0))
                attempt += 1
            except sa.exc.SQLAlchemyError as exc:
                detail = getattr(exc, "orig", None) or exc
                raise BackendError(f"{what} failed: {detail}") from exc

    def create_tables(self) -> None:
        """Create the tables (and add missing nullable columns). Idempotent.

        Raises:
            BackendError: the database refused, even after retries.
        """
        def setup(conn: Connection) -> None:
            self._tables.metadata.create_all(conn, checkfirst=True)
            _sql.add_missing_columns(conn, self._tables.task)
            _sql.add_missing_columns(conn, self._tables.group)

        # Several processes may create the same tables at once; the losers see
        # "already exists" errors and succeed on the next look.
        for attempt in range(5):
            try:
                self._run("creating the result tables", setup, write=True, setup=True)
                break
            except BackendError:
                if attempt == 4:
                    raise
                time.sleep(0.05 * (attempt + 1))
        self._tables_ready = True

    # -- encoding -----------------------------------------------------------------------

    def _decode(self, data: Any) -> Any:
        if data is None:
            return None
        raw = bytes(data)
        try:
            return self._codec.decode(raw)
        except DecodeError:
            # Rows written by Celery 5.5/5.6 (PickleType) start with pickle's
            # protocol marker. Unpickling runs code: only when allowed.
            if raw[:1] != b"\x80":
                raise
            if not self._codec.accepts("pickle"):
                raise ContentDisallowed(
                    "this result was stored pickled (by Celery 5.5/5.6); add 'pickle' to "
                    "result_accept_content to read it, only if you trust every writer"
                ) from None
            return pickle.loads(raw)

    def _row_values(self, meta: ResultMeta) -> dict[str, Any]:
        encode = self._codec.encode
        children = meta.get("children")
        values: dict[str, Any] = {
            "status": meta["status"],
            "result": encode(meta.get("result")),
            "traceback": meta.get("traceback"),
            "date_done": _naive_utc(meta.get("date_done")),
            "children": encode(children) if children else None,
        }
        for name in _EXTENDED:
            values[name] = meta.get(name)
        for name in ("args", "kwargs"):
            value = meta.get(name)
            values[name] = None if value is None else encode(value)
        return values

    def _row_to_meta(self, row: Row[Any]) -> ResultMeta:
        meta: ResultMeta = {
            "status": row.status,
            "result": self._decode(row.result),
            "traceback": row.traceback,
            "children": self._decode(row.children) or [],
            "date_done": _aware_iso(row.date_done),
        }
        if self.options.extended or any(getattr(row, n) is not None for n in _EXTENDED):
            meta["name"] = row.name
            meta["args"] = self._decode(row.args)
            meta["kwargs"] = self._decode(row.kwargs)
            meta["worker"] = row.worker
            meta["retries"] = row.retries
            meta["queue"] = row.queue
        meta["task_id"] = row.task_id
        return meta

    # -- task results -------------------------------------------------------------------

    def store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        *,
        traceback: str | None = None,
        context: ResultContext | None = None,
    ) -> ResultMeta:
        """Store ``state``/``result``; a stored SUCCESS is kept and returned instead.

        Raises:
            EncodeError: the result cannot be serialized.
            BackendError: the database failed.
        """
        meta = make_meta(task_id, state, result, traceback=traceback, context=context,
                         extended=self.options.extended)
        values = self._row_values(meta)
        table = self._tables.task
        where = table.c.task_id == task_id

        def write(conn: Connection) -> Row[Any] | None:
            if conn.execute(sa.select(table.c.id).where(where)).first() is not None:
                # Lock only an existing row: locking a missing one takes a gap
                # lock on MySQL, which deadlocks concurrent inserts.
                row = conn.execute(sa.select(table).where(where).with_for_update()).one()
                if row.status == states.SUCCESS:
                    return row
                conn.execute(sa.update(table).where(where).values(values))
            else:
                conn.execute(sa.insert(table).values(task_id=task_id, **values))
            return None

        try:
            kept = self._run(f"storing the result of {task_id}", write, write=True)
        except BackendError as exc:
            if not isinstance(exc.__cause__, sa.exc.IntegrityError):
                raise
            # Another writer inserted the row first; now it exists: go again.
            kept = self._run(f"storing the result of {task_id}", write, write=True)
        return meta if kept is None else self._row_to_meta(kept)

    def get_task_meta(self, task_id: str) -> ResultMeta:
        """The stored meta, or a PENDING meta."""
        table = self._tables.task
        row = self._run(
            f"reading the result of {task_id}",
            lambda conn: conn.execute(sa.select(table).where(table.c.task_id == task_id)).first(),
            write=False,
        )
        if row is None:
            return make_meta(task_id, states.PENDING, None)
        return self._row_to_meta(row)

    def get_task_metas(self, task_ids: Iterable[str]) -> dict[str, ResultMeta]:
        """The metas of ``task_ids``, by ``SELECT ... WHERE task_id IN (...)``.

        One statement per ``IN_BATCH`` ids; PENDING metas for unknown ids.
        """
        ids = list(dict.fromkeys(task_ids))
        table = self._tables.task
        rows: dict[str, Row[Any]] = {}

        def read(conn: Connection, batch: list[str]) -> Sequence[Row[Any]]:
            return conn.execute(sa.select(table).where(table.c.task_id.in_(batch))).all()

        for start in range(0, len(ids), IN_BATCH):
            batch = ids[start:start + IN_BATCH]
            found = self._run(f"reading {len(batch)} results", partial(read, batch=batch),
                              write=False)
            rows.update((row.task_id, row) for row in found)
        return {task_id: (self._row_to_meta(rows[task_id]) if task_id in rows
                          else make_meta(task_id, states.PENDING, None)) for task_id in ids}

    def task_result_exists(self, task_id: str) -> bool:
        """True when a row exists for ``task_id``."""
        table = self._tables.task
        found = self._run(
            f"checking the result of {task_id}",
            lambda conn: conn.execute(
                sa.select(table.c.id).where(table.c.task_id == task_id)).first(),
            write=False,
        )
        return found is not None

    def forget(self, task_id: str) -> None:
        """Delete the row of ``task_id``."""
        table = self._tables.task
        self._run(f"forgetting {task_id}",
                  lambda conn: conn.execute(sa.delete(table).where(table.c.task_id == task_id)),
                  write=True)

    # -- groups and counters ------------------------------------------------------------

    def save_group(self, group_id: str, result: Any) -> None:
        """Store (or replace) a group's result tuple."""
        table = self._tables.group
        values = {"result": self._codec.encode(result),
                  "date_done": datetime.now(UTC).replace(tzinfo=None)}
        where = table.c.taskset_id == group_id

        def write(conn: Connection) -> None:
            if conn.execute(sa.select(table.c.id).where(where)).first() is not None:
                conn.execute(sa.update(table).where(where).values(values))
            else:
                conn.execute(sa.insert(table).values(taskset_id=group_id, **values))

        self._run(f"saving group {group_id}", write, write=True)

    def restore_group(self, group_id: str) -> Any | None:
        """The stored group tuple, or ``None``."""
        table = self._tables.group
        data = self._run(
            f"restoring group {group_id}",
            lambda conn: conn.execute(
                sa.select(table.c.result).where(table.c.taskset_id == group_id)
            ).scalar_one_or_none(),
            write=False,
        )
        return self._decode(data)

    def delete_group(self, group_id: str) -> None:
        """Delete a stored group."""
        table = self._tables.group
        self._run(f"deleting group {group_id}",
                  lambda conn: conn.execute(
                      sa.delete(table).where(table.c.taskset_id == group_id)),
                  write=True)

    def incr(self, key: str) -> int:
        """Atomically add one to counter ``key`` and return the new value.

        Note: a connection lost while the server commits is retried like any
        transient error, so in that rare case one call may count twice.
        """
        table = self._tables.counter
        return self._run(f"incrementing counter {key}",
                         lambda conn: _sql.counter_incr(conn, table, key), write=True)

    def delete_counter(self, key: str) -> None:
        """Delete the row of counter ``key``."""
        table = self._tables.counter
        self._run(f"deleting counter {key}",
                  lambda conn: conn.execute(sa.delete(table).where(table.c["key"] == key)),
                  write=True)

    # -- revoked task ids ---------------------------------------------------------------

    def add_revokes(self, entries: Mapping[str, float]) -> None:
        """Upsert the ids (atomic per row) and count the add, in one transaction; then
        delete the expired rows."""
        if not entries:
            return
        tables = self._tables

        def write(conn: Connection) -> None:
            _sql.revokes_upsert(conn, tables.revoked, entries)
            _sql.counter_incr(conn, tables.counter, REVOKES_COUNTER)

        self._run("recording revoked ids", write, write=True)
        self._run("deleting expired revoked ids", self._purge_revokes, write=True)

    def _purge_revokes(self, conn: Connection) -> int:
        table = self._tables.revoked
        return int(conn.execute(
            sa.delete(table).where(table.c.expires_at <= time.time())).rowcount)

    def load_revokes(self) -> dict[str, float]:
        """The rows whose expiry is later than now."""
        table = self._tables.revoked
        rows = self._run("loading revoked ids", lambda conn: conn.execute(
            sa.select(table.c.task_id, table.c.expires_at)
            .where(table.c.expires_at > time.time())).all(), write=False)
        return {str(task_id): float(at) for task_id, at in rows}

    def revokes_version(self) -> str | None:
        """The add counter (one ``SELECT``)."""
        table = self._tables.counter
        value = self._run("reading the revoked ids' version", lambda conn: conn.execute(
            sa.select(table.c.value).where(table.c["key"] == REVOKES_COUNTER)
        ).scalar_one_or_none(), write=False)
        return "" if value is None else str(value)

    # -- housekeeping -------------------------------------------------------------------

    def cleanup(self) -> int:
        """Delete task and group rows whose ``date_done`` is older than ``expires``.

        FAILURE rows are kept ``failure_expires`` instead, when that is set.
        """
        expires, failure_expires = self.options.expires, self.options.failure_expires
        if expires is None and failure_expires is None:
            return 0
        now = datetime.now(UTC).replace(tzinfo=None)
        task, group = self._tables.task, self._tables.group
        old: list[sa.ColumnElement[bool]] = []
        if failure_expires is not None:
            old.append(sa.and_(task.c.status == states.FAILURE,
                               task.c.date_done < now - timedelta(seconds=failure_expires)))
        if expires is not None:
            cutoff = now - timedelta(seconds=expires)
            old.append(task.c.date_done < cutoff if failure_expires is None
                       else sa.and_(task.c.status != states.FAILURE, task.c.date_done < cutoff))

        def delete(conn: Connection) -> int:
            self._purge_revokes(conn)
            done = conn.execute(sa.delete(task).where(sa.or_(*old))).rowcount
            if expires is not None:
                done += conn.execute(sa.delete(group).where(group.c.date_done < cutoff)).rowcount
            return int(done)

        return self._run("cleaning up expired results", delete, write=True)

    def close(self) -> None:
        """Dispose of the engine and its pooled connections."""
        with self._lock:
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._sa_url.render_as_string(hide_password=True)}>"
