"""What only the SQL transport promises, on real PostgreSQL and SQLite.

LISTEN/NOTIFY wake-ups, translation of a dropped database connection into
ConnectionLost, recovery through Connection.ensure, and the table layout.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import services
import sqlalchemy as sa

from taskframe.transport import Connection, Envelope, Producer, Queue
from taskframe.transport.errors import ConnectionLost
from taskframe.transport.sql import SQLTransport
from taskframe.transport.sql_schema import PgListener, sqlalchemy_url


@pytest.fixture
def pg() -> Iterator[tuple[str, str, str]]:
    """(broker URL tagged with a unique application_name, table prefix, that name)."""
    app_name = f"tf-{uuid.uuid4().hex[:12]}"
    prefix = f"tfs_{uuid.uuid4().hex[:10]}_"
    url = f"sqla+{services.postgres_url()}?application_name={app_name}"
    yield url, prefix, app_name
    engine = sa.create_engine(sqlalchemy_url(url))
    with engine.begin() as conn:
        for table in ("messages", "bindings"):
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {prefix}{table}"))
    engine.dispose()


def kill_backends(url: str, app_name: str) -> int:
    """Terminate every server connection opened with ``app_name`` (as a crash would)."""
    engine = sa.create_engine(sqlalchemy_url(url.split("?")[0]))
    with engine.begin() as conn:
        killed = conn.execute(
            sa.text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = :name"
            ),
            {"name": app_name},
        ).scalar()
    engine.dispose()
    return int(killed or 0)


@pytest.mark.postgres
def test_tables_use_the_prefix(pg: tuple[str, str, str]) -> None:
    url, prefix, _ = pg
    transport = SQLTransport(url, {"table_prefix": prefix})
    transport.connect()
    transport.close()
    engine = sa.create_engine(sqlalchemy_url(url))
    names = set(sa.inspect(engine).get_table_names())
    indexes = {i["name"] for i in sa.inspect(engine).get_indexes(f"{prefix}messages")}
    engine.dispose()
    assert {f"{prefix}messages", f"{prefix}bindings"} <= names
    assert {f"{prefix}messages_ready_idx", f"{prefix}messages_claim_idx"} <= indexes


@pytest.mark.postgres
def test_publish_notifies_listeners(pg: tuple[str, str, str]) -> None:
    url, prefix, _ = pg
    transport = SQLTransport(url, {"table_prefix": prefix})
    transport.connect()
    engine = sa.create_engine(sqlalchemy_url(url))
    listener = PgListener(engine, f"{prefix}messages", connect_timeout=4)
    try:
        assert listener.wait(0.1) is False
        transport.publish(Envelope(b"{}"), exchange="", routing_key="q")
        assert listener.wait(30) is True
    finally:
        listener.close()
        engine.dispose()
        transport.close()


@pytest.mark.postgres
def test_dropped_database_connection_is_connection_lost(pg: tuple[str, str, str]) -> None:
    url, prefix, app_name = pg
    transport = SQLTransport(url, {"table_prefix": prefix})
    transport.connect()
    transport.consume([Queue("q")])
    assert kill_backends(url, app_name) >= 1
    with pytest.raises(ConnectionLost):
        transport.poll(timeout=1)
    transport.close()


@pytest.mark.postgres
def test_ensure_recovers_a_publish_after_the_connection_dropped(pg: tuple[str, str, str]) -> None:
    url, prefix, app_name = pg
    with Connection(url, transport_options={"table_prefix": prefix}) as conn:
        producer = Producer(conn)
        producer.publish({"n": 1}, routing_key="q", retry=True)
        assert kill_backends(url, app_name) >= 1
        producer.publish({"n": 2}, routing_key="q", retry=True, retry_policy={"max_retries": 3})
        assert conn.transport.queue_size("q") == 2


def test_sqlite_is_shared_by_transports_and_survives_reopening(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'nested' / 'dir' / 'broker.sqlite3'}"
    first = SQLTransport(url)
    first.connect()
    first.publish(Envelope(b"1"), exchange="", routing_key="q", delay=0.2)
    first.close()
    second = SQLTransport("sqla+" + url, {"polling_interval": 0.01})
    second.connect()
    second.consume([Queue("q")])
    received = []
    deadline = time.monotonic() + 15
    while not received and time.monotonic() < deadline:
        received = second.poll(timeout=1)
    assert [m.body for m in received] == [b"1"]
    received[0].ack()
    second.close()
    engine = sa.create_engine(sqlalchemy_url(url))
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    engine.dispose()


def test_claims_survive_a_reconnect_and_a_lost_claim_reply_is_released(tmp_path: Path) -> None:
    """After ``drop()`` and ``connect()`` the rows held before are still held (the token is
    the transport's), and a row carrying our token that we never heard of (a claim whose
    reply was lost) is released at once instead of being kept claimed by every refresh."""
    url = f"sqlite:///{tmp_path / 'broker.sqlite3'}"
    transport = SQLTransport(url, {"visibility_timeout": 3600, "polling_interval": 0.01})
    other = SQLTransport(url, {"polling_interval": 0.01})
    try:
        transport.connect()
        transport.consume([Queue("q")])
        for n in range(2):
            transport.publish(Envelope(f"{n}".encode()), exchange="", routing_key="q")
        held = transport.poll(timeout=5)
        assert [m.body for m in held] == [b"0", b"1"]
        transport.publish(Envelope(b"lost reply"), exchange="", routing_key="q")
        engine = sa.create_engine(sqlalchemy_url(url))
        with engine.begin() as conn:  # what a claim whose reply never came leaves behind
            conn.execute(sa.text("UPDATE taskframe_messages SET claim = :t, claimed_until = :u "
                                 "WHERE claim IS NULL"), {"t": transport.token, "u": 4e9})
        engine.dispose()
        transport.drop()
        transport.connect()
        other.connect()
        other.consume([Queue("q")])
        got = other.poll(timeout=5)
        assert [m.body for m in got] == [b"lost reply"]
        assert other.poll(timeout=0.2) == []  # the two held ones are still held
        for message in [*held, *got]:
            message.ack()
        assert transport.queue_size("q") == 0
    finally:
        other.close()
        transport.close()


@pytest.mark.postgres
def test_consumer_recovers_after_connection_lost_without_reconnecting(
    pg: tuple[str, str, str],
) -> None:
    url, prefix, app_name = pg
    transport = SQLTransport(url, {"table_prefix": prefix})
    transport.connect()
    transport.consume([Queue("q")])
    assert transport.poll(timeout=0.1) == []  # opens the LISTEN connection
    kill_backends(url, app_name)
    with pytest.raises(ConnectionLost):
        transport.poll(timeout=1)
    # The pool replaces dead connections and the LISTEN connection is reopened.
    transport.publish(Envelope(b"again"), exchange="", routing_key="q")
    received = []
    deadline = time.monotonic() + 15
    while not received and time.monotonic() < deadline:
        received = transport.poll(timeout=1)
    assert [m.body for m in received] == [b"again"]
    received[0].ack()
    transport.close()


def _older_table(engine: sa.Engine, prefix: str) -> None:
    """The messages table as taskframe made it before ``failed_deliveries``, with a row."""
    with engine.begin() as conn:
        conn.execute(sa.text(f"ALTER TABLE {prefix}messages DROP COLUMN failed_deliveries"))
        conn.execute(sa.text(
            f"INSERT INTO {prefix}messages (queue, priority, due_at, delivery_count, body, "
            "content_type, content_encoding, headers, properties, exchange, routing_key, "
            "created_at) VALUES ('old', 0, 0, 0, :body, 'application/json', 'utf-8', '{}', "
            "'{}', '', 'old', 0)"), {"body": b"[1]"})


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_an_older_table_gets_the_failed_deliveries_column(kind: str, tmp_path: Path) -> None:
    prefix = f"tfs_{uuid.uuid4().hex[:10]}_"
    url = (f"sqlite:///{tmp_path / 'old.sqlite3'}" if kind == "sqlite"
           else f"sqla+{services.postgres_url()}")
    first = SQLTransport(url, {"table_prefix": prefix})
    first.connect()
    first.close()
    engine = sa.create_engine(sqlalchemy_url(url))
    try:
        _older_table(engine, prefix)
        transport = SQLTransport(url, {"table_prefix": prefix})
        transport.connect()  # adds the column; the old row reads as never failed
        columns = {c["name"] for c in sa.inspect(engine).get_columns(f"{prefix}messages")}
        assert "failed_deliveries" in columns
        transport.consume([Queue("old")])
        [message] = transport.poll(timeout=5)
        assert message.body == b"[1]" and message.delivery_count == 1
        message.requeue_failed()
        [message] = transport.poll(timeout=5)
        assert message.delivery_count == 2
        message.ack()
        transport.close()
        again = SQLTransport(url, {"table_prefix": prefix})
        again.connect()  # a second open: nothing to add
        again.close()
    finally:
        with engine.begin() as conn:
            for table in ("messages", "bindings"):
                conn.execute(sa.text(f"DROP TABLE IF EXISTS {prefix}{table}"))
        engine.dispose()


def test_a_failed_delivery_or_dead_letter_waits_for_the_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'broker.sqlite3'}"
    transport = SQLTransport(url, {})
    transport.connect()
    transport.consume([Queue("q")])
    for n in range(2):
        transport.publish(Envelope(f"[{n}]".encode()), exchange="", routing_key="q")
    first, second = transport.poll(timeout=5)
    transport.drop()  # the database is gone: both stay claimed, their settles wait
    first.requeue_failed()
    assert second.dead_letter() == "q.dead"
    transport.connect()  # written now, as they were asked
    [again] = transport.poll(timeout=5)
    assert again.body == first.body and again.delivery_count == 2
    again.ack()
    assert transport.queue_size("q.dead") == 1
    transport.close()
