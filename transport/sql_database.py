"""The SQL transport's database: its engine, and every transaction run against it.

A ``Database`` opens the engine (creating the missing tables, see ``sql_schema``) and
disposes of it; ``run`` runs a piece of work in one transaction, runs it again after a
deadlock or serialization failure, and turns SQLAlchemy and DB-API errors into
transport errors (``sql_schema.translate_errors``); ``notify`` wakes PostgreSQL
consumers at commit.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import sqlalchemy as sa

from .errors import BrokerConnectionError
from .sql_schema import Tables, build_engine, create_tables, is_transient, translate_errors

__all__ = ["Database"]

logger = logging.getLogger("taskframe.transport.sql")

# Deadlocks and serialization failures (InnoDB, PostgreSQL) are retried this often.
_TRANSIENT_RETRIES = 5

T = TypeVar("T")


class Database:
    """The engine of one transport, and its transactions.

    Args:
        url: the SQLAlchemy URL.
        tables: the transport's tables.
        options: the transport options (read when the engine is built).
        connect_timeout: seconds to wait for the database.
        owner: how error and log messages name the transport.
    """

    def __init__(self, url: sa.URL, tables: Tables, options: Mapping[str, Any],
                 connect_timeout: float, owner: str) -> None:
        self.engine: sa.Engine | None = None
        #: Whether the database is PostgreSQL (NOTIFY, ``synchronous_commit``).
        self.postgres = False
        self._url = url
        self._tables = tables
        self._options = options
        self._connect_timeout = connect_timeout
        self._owner = owner

    def open(self) -> None:
        """Build the engine and create the missing tables.

        Raises:
            BrokerConnectionError: the database cannot be reached.
        """
        options = {**self._options, "connect_timeout": self._connect_timeout}
        engine = build_engine(self._url, options)
        try:
            with translate_errors(f"cannot connect to {self._owner}", connecting=True):
                create_tables(engine, self._tables)
        except BaseException:
            engine.dispose()
            raise
        self.engine = engine
        self.postgres = engine.dialect.name == "postgresql"

    def close(self) -> None:
        """Dispose of the engine (its pooled connections close)."""
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.dispose()

    def require(self) -> sa.Engine:
        """The engine; ``BrokerConnectionError`` when the transport is not connected."""
        if self.engine is None:
            raise BrokerConnectionError(f"{self._owner} is not connected")
        return self.engine

    def run(self, action: str, work: Callable[[sa.Connection], T]) -> T:
        """Run ``work`` in one transaction, retrying deadlocks; translate errors."""
        engine = self.require()
        with translate_errors(action):
            for attempt in range(1, _TRANSIENT_RETRIES + 1):
                try:
                    with engine.begin() as conn:
                        return work(conn)
                except sa.exc.DBAPIError as exc:
                    if attempt == _TRANSIENT_RETRIES or not is_transient(exc):
                        raise
                    logger.debug("%s: %s: retrying after %s", self._owner, action, exc.orig)
                    time.sleep(random.uniform(0.0, 0.01 * attempt))
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def notify(self, conn: sa.Connection) -> None:
        """Wake the consumers waiting on PostgreSQL (at commit, so they find the rows)."""
        if self.postgres:
            conn.execute(sa.select(sa.func.pg_notify(self._tables.channel, "")))
