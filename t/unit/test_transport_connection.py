"""Connection (schemes, retries, failover, ensure), Producer and Consumer on memory://."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import services

from taskframe.transport import Connection, Consumer, Exchange, Message, Producer, Queue, Transport
from taskframe.transport.connection import backoff_interval, known_schemes
from taskframe.transport.errors import (
    BrokerConnectionError,
    ConnectionLost,
    EncodeError,
    ImproperlyConfigured,
)

# Nothing listens on port 1: connecting fails at once, no server needed.
UNREACHABLE = "sqla+postgresql://postgres:secret@127.0.0.1:1/test"
FAST = {"interval_start": 0.01, "interval_step": 0.01, "interval_max": 0.02}


@pytest.fixture
def memory_url() -> str:
    return f"memory://conn-{uuid.uuid4().hex}"


def test_unknown_scheme_lists_known_ones() -> None:
    with pytest.raises(ImproperlyConfigured) as info:
        Connection("gopher://x:secret@h/")
    for scheme in known_schemes():
        assert scheme in str(info.value)
    assert "secret" not in str(info.value)


def test_sqlite_in_memory_is_refused() -> None:
    with pytest.raises(ImproperlyConfigured):
        Connection("sqlite://").transport  # noqa: B018 - the property builds the transport


def test_ensure_connection_gives_up_after_max_retries() -> None:
    psycopg = services.require_module("psycopg")
    assert psycopg
    errors: list[tuple[Exception, float]] = []
    conn = Connection(UNREACHABLE, connect_timeout=2)
    with pytest.raises(BrokerConnectionError) as info:
        conn.ensure_connection(max_retries=2, on_error=lambda e, s: errors.append((e, s)), **FAST)
    assert len(errors) == 2
    assert all(isinstance(e, BrokerConnectionError) for e, _ in errors)
    assert all(0.0 <= s <= FAST["interval_max"] for _, s in errors)
    assert "3 attempt" in str(info.value)
    assert "secret" not in str(info.value) and "secret" not in repr(conn)
    assert not conn.connected


def test_failover_moves_to_the_next_url_at_once(memory_url: str) -> None:
    services.require_module("psycopg")
    waits: list[float] = []
    conn = Connection(f"{UNREACHABLE};{memory_url}")
    conn.ensure_connection(max_retries=1, on_error=lambda e, s: waits.append(s), **FAST)
    assert conn.connected
    assert conn.url == memory_url
    assert waits == [0.0]
    conn.close()


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    for round_number, base in [(0, 1.0), (1, 3.0), (2, 7.0), (3, 10.0), (50, 10.0)]:
        for _ in range(20):
            interval = backoff_interval(round_number, 1.0, 2.0, 10.0)
            assert base / 2 <= interval <= base


def test_ensure_reruns_after_connection_lost(memory_url: str) -> None:
    conn = Connection(memory_url)
    used: list[Transport] = []

    def flaky(transport: Transport) -> str:
        used.append(transport)
        if len(used) == 1:
            raise ConnectionLost("link dropped")
        return "done"

    assert conn.ensure(flaky, {"interval_start": 0, "interval_step": 0}) == "done"
    assert len(used) == 2
    assert used[0] is not used[1]  # reconnected: a fresh transport
    assert not used[0].connected and used[1].connected

    def always_down(transport: Transport) -> None:
        raise ConnectionLost("still down")

    with pytest.raises(ConnectionLost):
        conn.ensure(always_down, {"max_retries": 2, **FAST})
    conn.close()


def test_producer_consumer_roundtrip(memory_url: str) -> None:
    queue = Queue("jobs")
    received: list[tuple[Any, dict[str, Any]]] = []

    def on_message(message: Message) -> None:
        received.append((message.decode(["json", "yaml"]), message.headers))
        message.ack()

    with Connection(memory_url) as conn:
        producer = Producer(conn, compression="zlib")
        producer.publish({"n": 1}, routing_key="jobs", declare=[queue], headers={"h": "v"})
        producer.publish({"n": 2}, routing_key="jobs", compression="bzip2", priority=9)
        producer.publish({"n": 3}, routing_key="jobs", serializer="yaml")
        with Consumer(conn, [queue], on_message, prefetch_count=5) as consumer:
            handled = 0
            while handled < 3:
                handled += consumer.drain_events(timeout=1)
    assert [body for body, _ in received] == [{"n": 2}, {"n": 1}, {"n": 3}]
    assert received[0][1]["compression"] == "application/x-bz2"
    assert received[1][1] == {"h": "v", "compression": "application/x-gzip"}


def test_yaml_needs_accept(memory_url: str) -> None:
    with Connection(memory_url) as conn:
        Producer(conn).publish([1, 2], routing_key="y", serializer="yaml")
        consumer = Consumer(conn, [Queue("y")], lambda m: None)
        consumer.consume()
        [message] = conn.transport.poll(timeout=1)
        assert message.decode(["yaml"]) == [1, 2]


def test_raw_bodies_and_encode_errors(memory_url: str) -> None:
    with Connection(memory_url) as conn:
        producer = Producer(conn)
        producer.publish(b"\x00raw", routing_key="r", content_type="application/data")
        producer.publish("text", routing_key="r", content_type="text/plain")
        with pytest.raises(EncodeError):
            producer.publish(object(), routing_key="r")
        with pytest.raises(EncodeError):
            producer.publish({"a": 1}, routing_key="r", content_type="application/data")
        with pytest.raises(ImproperlyConfigured):
            producer.publish({"a": 1}, routing_key="r", serializer="nope")
        conn.transport.consume([Queue("r")])
        first, second = conn.transport.poll(timeout=1)
        assert (first.body, first.content_encoding) == (b"\x00raw", "binary")
        assert (second.body, second.content_type, second.content_encoding) == (
            b"text",
            "text/plain",
            "utf-8",
        )


def test_consumer_resumes_after_reconnect(memory_url: str) -> None:
    conn = Connection(memory_url)
    got: list[Any] = []
    consumer = Consumer(conn, [Queue("q", Exchange("ex", "topic"), "a.#")], lambda m: got.append(m))
    consumer.consume()
    conn.close()
    conn.ensure_connection(max_retries=0)
    Producer(conn).publish("x", routing_key="a.b", exchange="ex", retry=True)
    assert consumer.drain_events(timeout=1) == 1
    assert got[0].decode() == "x"
    consumer.cancel()
    conn.close()
