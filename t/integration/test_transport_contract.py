"""The transport contract: every transport passes the same tests on a real broker.

Parametrized over memory, SQLite (a file in tmp_path), PostgreSQL and MariaDB
(both with a unique table prefix per test, dropped afterwards). Claim expiry is
tested on the SQL transports only: a memory transport's holder lives in the
test's own process and gives its messages back when it is collected.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import services
import sqlalchemy as sa

from taskframe.transport import Envelope, Exchange, Message, Queue, Transport
from taskframe.transport.connection import transport_class
from taskframe.transport.errors import MessageStateError
from taskframe.transport.sql_schema import sqlalchemy_url

# Generous guard so a broken transport fails instead of hanging; never a timing assertion.
PATIENCE = 15.0


@dataclass
class Broker:
    """Makes connected transports that share one broker, and cleans up after the test."""

    kind: str
    url: str
    options: dict[str, Any]
    made: list[Transport] = field(default_factory=list)

    def make(self, **options: Any) -> Transport:
        transport = transport_class(self.url)(self.url, {**self.options, **options})
        transport.connect()
        self.made.append(transport)
        return transport


def _drop_tables(url: str, prefix: str) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            for name in ("messages", "bindings"):
                conn.execute(sa.text(f"DROP TABLE IF EXISTS {prefix}{name}"))
    finally:
        engine.dispose()


SQL_KINDS = [
    "sqlite",
    pytest.param("postgres", marks=pytest.mark.postgres),
    pytest.param("mariadb", marks=pytest.mark.mysql),
]


@contextlib.contextmanager
def open_broker(kind: str, tmp_path: Path) -> Iterator[Broker]:
    prefix = f"tfc_{uuid.uuid4().hex[:10]}_"
    server_url = None
    if kind == "memory":
        url, options = f"memory://contract-{uuid.uuid4().hex}", {}
    elif kind == "sqlite":
        url, options = f"sqlite:///{tmp_path / 'broker.sqlite3'}", {}
    else:
        server_url = services.postgres_url() if kind == "postgres" else services.mysql_url()
        url, options = "sqla+" + server_url, {"table_prefix": prefix}
    b = Broker(kind, url, options)
    try:
        yield b
    finally:
        for transport in b.made:
            transport.close()
        if server_url is not None:
            _drop_tables(sqlalchemy_url(url).render_as_string(hide_password=False), prefix)


@pytest.fixture(params=["memory", *SQL_KINDS])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Broker]:
    """Every transport."""
    with open_broker(request.param, tmp_path) as b:
        yield b


@pytest.fixture(params=SQL_KINDS)
def expiring_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Broker]:
    """Transports whose claims expire (the memory transport's holders cannot vanish)."""
    with open_broker(request.param, tmp_path) as b:
        yield b


@pytest.fixture
def qname() -> str:
    return f"q-{uuid.uuid4().hex[:12]}"


def envelope(n: int, **properties: Any) -> Envelope:
    return Envelope(
        body=f'{{"n": {n}}}'.encode(),
        headers={"id": str(n), "nested": {"a": [1, 2]}},
        properties={"correlation_id": f"c{n}", **properties},
    )


def number(message: Message) -> int:
    return int(message.headers["id"])


def poll_until(transport: Transport, count: int, timeout: float = PATIENCE) -> list[Message]:
    """Poll until ``count`` messages arrived (or the guard runs out); return them in order."""
    received: list[Message] = []
    deadline = time.monotonic() + timeout
    while len(received) < count and time.monotonic() < deadline:
        received.extend(transport.poll(timeout=0.5))
    return received


def consumer(broker: Broker, *queues: Queue, prefetch: int = 0, **options: Any) -> Transport:
    transport = broker.make(**options)
    transport.consume(list(queues), prefetch_count=prefetch)
    return transport


def test_publish_poll_ack(broker: Broker, qname: str) -> None:
    producer = broker.make()
    producer.declare(Queue(qname))
    producer.publish(envelope(1, priority=0), exchange="", routing_key=qname)
    assert producer.queue_size(qname) == 1

    transport = consumer(broker, Queue(qname))
    [message] = poll_until(transport, 1)
    assert message.body == b'{"n": 1}'
    assert message.content_type == "application/json"
    assert message.content_encoding == "utf-8"
    assert message.headers == {"id": "1", "nested": {"a": [1, 2]}}
    assert message.properties["correlation_id"] == "c1"
    assert message.delivery_info["routing_key"] == qname
    assert message.delivery_info["queue"] == qname
    assert message.delivery_info["exchange"] == ""
    assert message.delivery_info["redelivered"] is False
    assert producer.queue_size(qname) == 0  # held, not ready

    message.ack()
    with pytest.raises(MessageStateError):
        message.ack()
    assert transport.poll(timeout=0.2) == []
    assert consumer(broker, Queue(qname)).poll(timeout=0.2) == []


def test_reject_requeue_redelivers(broker: Broker, qname: str) -> None:
    transport = consumer(broker, Queue(qname))
    transport.publish(envelope(1), exchange="", routing_key=qname)
    [first] = poll_until(transport, 1)
    first.reject(requeue=True)
    [again] = poll_until(transport, 1)
    assert again.body == first.body
    assert again.delivery_info["redelivered"] is True
    again.ack()
    assert transport.queue_size(qname) == 0


def test_reject_drop_removes(broker: Broker, qname: str) -> None:
    transport = consumer(broker, Queue(qname))
    transport.publish(envelope(1), exchange="", routing_key=qname)
    [message] = poll_until(transport, 1)
    message.reject(requeue=False)
    assert transport.poll(timeout=0.3) == []
    assert transport.queue_size(qname) == 0


def test_prefetch_bound(broker: Broker, qname: str) -> None:
    transport = consumer(broker, Queue(qname), prefetch=2)
    for n in range(5):
        transport.publish(envelope(n), exchange="", routing_key=qname)
    held = poll_until(transport, 2)
    assert len(held) == 2
    assert transport.poll(timeout=0.2) == []  # full: nothing more until we settle
    held.pop(0).ack()
    more = poll_until(transport, 1)
    assert len(more) == 1
    held += more
    transport.set_prefetch(0)
    rest = poll_until(transport, 2)
    assert sorted(number(m) for m in held + rest) == [1, 2, 3, 4]


def test_priorities_then_fifo(broker: Broker, qname: str) -> None:
    producer = broker.make()
    for n, priority in enumerate([0, 5, 1, 9, 5, 0]):
        producer.publish(envelope(n, priority=priority), exchange="", routing_key=qname)
    transport = consumer(broker, Queue(qname))
    received = poll_until(transport, 6)
    assert [number(m) for m in received] == [3, 1, 4, 2, 0, 5]
    assert [m.delivery_info["priority"] for m in received] == [9, 5, 5, 1, 0, 0]


def test_delayed_message_invisible_until_due(broker: Broker, qname: str) -> None:
    transport = consumer(broker, Queue(qname))
    delay = 1.5
    published_at = time.time()
    transport.publish(envelope(1), exchange="", routing_key=qname, delay=delay)
    transport.publish(envelope(2), exchange="", routing_key=qname)
    [now] = poll_until(transport, 1)
    assert number(now) == 2
    received = poll_until(transport, 1)
    assert [number(m) for m in received] == [1]
    # Delivered, and never before it was due.
    assert time.time() >= published_at + delay


def test_redelivery_after_visibility_timeout(
    expiring_broker: Broker, qname: str, caplog: pytest.LogCaptureFixture
) -> None:
    broker = expiring_broker
    # The holder never calls maintain() nor close(): as if it was killed.
    holder = consumer(broker, Queue(qname), visibility_timeout=1)
    holder.publish(envelope(1), exchange="", routing_key=qname)
    [held] = poll_until(holder, 1)
    other = consumer(broker, Queue(qname), visibility_timeout=1)
    [again] = poll_until(other, 1)
    assert number(again) == 1
    assert again.delivery_info["redelivered"] is True
    again.ack()
    with caplog.at_level(logging.WARNING):
        held.ack()  # too late: the claim was lost, and we are told so
    assert "claim was lost" in caplog.text


def test_maintain_keeps_the_claim(expiring_broker: Broker, qname: str) -> None:
    broker = expiring_broker
    visibility = 1.5
    holder = consumer(broker, Queue(qname), visibility_timeout=visibility)
    holder.publish(envelope(1), exchange="", routing_key=qname)
    [held] = poll_until(holder, 1)
    other = consumer(broker, Queue(qname), visibility_timeout=visibility)
    watch_until = time.monotonic() + 2 * visibility
    while time.monotonic() < watch_until:
        holder.maintain()
        assert other.poll(timeout=0.1) == []
    held.ack()
    assert other.poll(timeout=0.2) == []


def test_close_releases_claims(broker: Broker, qname: str) -> None:
    holder = consumer(broker, Queue(qname), prefetch=10)
    for n in range(3):
        holder.publish(envelope(n), exchange="", routing_key=qname)
    assert len(poll_until(holder, 3)) == 3
    holder.close()
    other = consumer(broker, Queue(qname))
    received = poll_until(other, 3)
    assert sorted(number(m) for m in received) == [0, 1, 2]
    assert all(m.delivery_info["redelivered"] for m in received)


def test_failed_deliveries_count_plain_requeues_do_not(broker: Broker, qname: str) -> None:
    transport = consumer(broker, Queue(qname))
    transport.publish(envelope(1), exchange="", routing_key=qname)
    [message] = poll_until(transport, 1)
    assert message.delivery_count == 1
    message.reject(requeue=True)  # a give-back: not a failed delivery
    [message] = poll_until(transport, 1)
    assert message.delivery_count == 1
    assert message.delivery_info["redelivered"] is True
    message.requeue_failed()  # the process running it died
    [message] = poll_until(transport, 1)
    assert message.delivery_count == 2
    message.requeue_failed()
    transport.close()  # held: the release on close is not a failed delivery either
    again = consumer(broker, Queue(qname))
    [message] = poll_until(again, 1)
    assert message.delivery_count == 3
    message.ack()


def test_dead_letter_keeps_the_message_aside_with_a_fresh_count(
        broker: Broker, qname: str) -> None:
    transport = consumer(broker, Queue(qname))
    transport.publish(envelope(7), exchange="", routing_key=qname)
    [message] = poll_until(transport, 1)
    message.requeue_failed()
    [message] = poll_until(transport, 1)
    assert message.delivery_count == 2
    assert message.dead_letter() == f"{qname}.dead"
    with pytest.raises(MessageStateError):
        message.ack()
    assert transport.poll(timeout=0.3) == []
    assert transport.queue_size(qname) == 0
    assert transport.queue_size(f"{qname}.dead") == 1
    # A queue like any other: consuming it runs the message again, counted afresh.
    dead = consumer(broker, Queue(f"{qname}.dead"))
    [kept] = poll_until(dead, 1)
    assert number(kept) == 7 and kept.body == message.body
    assert kept.delivery_count == 1
    kept.ack()


def test_an_expired_claim_is_a_failed_delivery(expiring_broker: Broker, qname: str) -> None:
    broker = expiring_broker
    # The holder never calls maintain() nor close(): as if it was killed.
    holder = consumer(broker, Queue(qname), visibility_timeout=1)
    holder.publish(envelope(1), exchange="", routing_key=qname)
    [held] = poll_until(holder, 1)
    assert held.delivery_count == 1
    other = consumer(broker, Queue(qname), visibility_timeout=1)
    [again] = poll_until(other, 1)
    assert again.delivery_count == 2
    again.reject(requeue=True)
    [again] = poll_until(other, 1)
    assert again.delivery_count == 2
    again.ack()


def test_purge_and_queue_size(broker: Broker, qname: str) -> None:
    transport = consumer(broker, Queue(qname), prefetch=1)
    assert transport.queue_size(f"never-{qname}") == 0
    for n in range(4):
        transport.publish(envelope(n), exchange="", routing_key=qname)
    transport.publish(envelope(9), exchange="", routing_key=qname, delay=60)
    [held] = poll_until(transport, 1)
    assert transport.queue_size(qname) == 3  # neither the held nor the delayed one
    assert transport.purge(qname) == 3
    assert transport.queue_size(qname) == 0
    held.ack()
    assert transport.poll(timeout=0.2) == []


def test_topic_routing(broker: Broker) -> None:
    exchange = Exchange(f"topic-{uuid.uuid4().hex[:8]}", "topic")
    patterns = {"a": "stock.*.nyse", "b": "stock.#", "c": "*.usd.*"}
    queues = {
        key: Queue(f"{key}-{uuid.uuid4().hex[:8]}", exchange, routing_key=pattern)
        for key, pattern in patterns.items()
    }
    producer = broker.make()
    for queue in queues.values():
        producer.declare(queue)
    for n, key in enumerate(["stock.usd.nyse", "stock.eur", "stock", "bond.usd.x", "fx.eur"]):
        producer.publish(envelope(n), exchange=exchange.name, routing_key=key)
    got = {}
    for key, queue in queues.items():
        received = poll_until(consumer(broker, queue), 1 if key != "b" else 3)
        got[key] = sorted(number(m) for m in received)
        assert all(m.delivery_info["exchange"] == exchange.name for m in received)
    assert got == {"a": [0], "b": [0, 1, 2], "c": [0, 3]}


def test_fanout_and_direct_routing(broker: Broker) -> None:
    fanout = Exchange(f"fan-{uuid.uuid4().hex[:8]}", "fanout")
    direct = Exchange(f"dir-{uuid.uuid4().hex[:8]}", "direct")
    fan_queues = [Queue(f"f{i}-{uuid.uuid4().hex[:8]}", fanout) for i in range(2)]
    direct_queue = Queue(f"d-{uuid.uuid4().hex[:8]}", direct, routing_key="key")
    producer = broker.make()
    for queue in [*fan_queues, direct_queue]:
        producer.declare(queue)
    producer.declare(direct_queue)  # declaring twice is harmless
    producer.publish(envelope(1), exchange=fanout.name, routing_key="ignored")
    producer.publish(envelope(2), exchange=direct.name, routing_key="other")  # unroutable
    producer.publish(envelope(3), exchange=direct.name, routing_key="key")
    for queue in fan_queues:
        assert [number(m) for m in poll_until(consumer(broker, queue), 1)] == [1]
    direct_consumer = consumer(broker, direct_queue)
    assert [number(m) for m in poll_until(direct_consumer, 1)] == [3]
    assert direct_consumer.poll(timeout=0.2) == []


def test_several_queues_and_cancel(broker: Broker) -> None:
    first, second = Queue(f"x-{uuid.uuid4().hex[:8]}"), Queue(f"y-{uuid.uuid4().hex[:8]}")
    transport = consumer(broker, first, second)
    transport.publish(envelope(1), exchange="", routing_key=first.name)
    transport.publish(envelope(2, priority=3), exchange="", routing_key=second.name)
    received = poll_until(transport, 2)
    assert [number(m) for m in received] == [2, 1]
    assert {m.delivery_info["queue"] for m in received} == {first.name, second.name}
    for message in received:
        message.ack()
    transport.cancel(second.name)
    transport.publish(envelope(3), exchange="", routing_key=second.name)
    assert transport.poll(timeout=0.3) == []
    assert transport.queue_size(second.name) == 1
