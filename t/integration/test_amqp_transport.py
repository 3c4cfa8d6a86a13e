"""The AMQP transport against the real RabbitMQ on loopback.

Every test uses queue and exchange names of its own and deletes them afterwards.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import services

from taskframe.transport import Envelope, Exchange, Message, Queue
from taskframe.transport.amqp import AMQPTransport
from taskframe.transport.amqp_delayed import DELIVERY_EXCHANGE, level_name
from taskframe.transport.connection import Connection, transport_class
from taskframe.transport.errors import (
    BrokerConnectionError,
    ConnectionLost,
    MessageStateError,
    PublishError,
    TransportError,
)

sys.path.insert(0, str(Path(__file__).parent / "amqpproj"))
import amqp_admin

pytestmark = pytest.mark.rabbitmq

# Generous guard so a broken transport fails instead of hanging; never a timing assertion.
PATIENCE = 30.0


@dataclass
class Rabbit:
    """Makes connected transports and names; deletes what the test made."""

    url: str
    made: list[AMQPTransport] = field(default_factory=list)
    queues: list[str] = field(default_factory=list)
    exchanges: list[str] = field(default_factory=list)

    def make(self, **options: Any) -> AMQPTransport:
        transport = AMQPTransport(self.url, options)
        transport.connect()
        self.made.append(transport)
        return transport

    def name(self, kind: str = "q") -> str:
        name = f"tfamqp-{kind}-{uuid.uuid4().hex[:10]}"
        (self.exchanges if kind == "x" else self.queues).append(name)
        return name

    def queue(self, **kwargs: Any) -> Queue:
        name = self.name()
        self.exchanges.append(name)  # the direct exchange named like the queue
        return Queue(name, **kwargs)


@pytest.fixture
def rabbit() -> Iterator[Rabbit]:
    r = Rabbit(services.rabbitmq_url())
    yield r
    for transport in r.made:
        transport.close()
    admin = AMQPTransport(r.url, {})
    admin.connect()
    try:
        for name in r.queues:
            admin.delete_queue(name)
        for name in r.exchanges:
            admin.delete_exchange(name)
    finally:
        admin.close()


def poll_until(transport: AMQPTransport, count: int, timeout: float = PATIENCE) -> list[Message]:
    """Poll until ``count`` messages came (or fail after ``timeout``)."""
    got: list[Message] = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        assert time.monotonic() < deadline, f"only {len(got)} of {count} messages arrived"
        got.extend(transport.poll(0.5))
    return got


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = PATIENCE) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def env(n: int, **headers: Any) -> Envelope:
    return Envelope(body=f'{{"n": {n}}}'.encode(), headers={"n": n, **headers})


def test_url_schemes_load_this_transport() -> None:
    for url in ("amqp://h//", "amqps://h/vh", "pyamqp://u:p@h:1/"):
        assert transport_class(url) is AMQPTransport


def test_publish_poll_ack(rabbit: Rabbit) -> None:
    t = rabbit.make()
    q = rabbit.queue()
    t.declare(q)
    envelope = Envelope(b'{"a": [1, 2]}', headers={"id": "abc", "nested": {"k": [1, None]}},
                        properties={"correlation_id": "abc", "reply_to": "r", "priority": 3})
    t.publish(envelope, exchange="", routing_key=q.name)
    t.publish(env(2), exchange=q.name, routing_key=q.name)  # through its direct exchange
    assert t.queue_size(q.name) == 2
    t.consume([q])
    first, second = poll_until(t, 2)
    assert first.body == b'{"a": [1, 2]}'
    assert first.content_type == "application/json" and first.content_encoding == "utf-8"
    assert first.headers == {"id": "abc", "nested": {"k": [1, None]}}
    assert first.properties["correlation_id"] == "abc"
    assert first.properties["reply_to"] == "r"
    assert first.properties["delivery_mode"] == 2
    assert first.delivery_info == {
        "exchange": "", "routing_key": q.name, "redelivered": False, "priority": 3,
        "queue": q.name, "consumer_tag": first.delivery_info["consumer_tag"],
        "delayed_routing_key": None, "delivery_count": 1,
    }
    assert second.delivery_info["exchange"] == q.name
    first.ack()
    second.ack()
    with pytest.raises(MessageStateError):
        first.ack()
    t.close()
    other = rabbit.make()
    assert other.queue_size(q.name) == 0


def test_unacked_messages_come_back_when_the_holder_closes(rabbit: Rabbit) -> None:
    q = rabbit.queue()
    holder = rabbit.make()
    holder.declare(q)
    holder.publish(env(1), exchange="", routing_key=q.name)
    holder.consume([q])
    (message,) = poll_until(holder, 1)
    holder.close()
    with pytest.raises(BrokerConnectionError):
        message.ack()
    second = rabbit.make()
    second.consume([q])
    (again,) = poll_until(second, 1)
    assert again.headers["n"] == 1 and again.delivery_info["redelivered"] is True
    again.ack()


def test_early_acks_are_confirmed_by_a_later_read(rabbit: Rabbit) -> None:
    """``ack_early`` writes the acks and a ``basic.qos`` without waiting; the ``qos-ok``,
    read while polling, confirms them. Until then they are ``unconfirmed_acks()``; a
    ``set_prefetch`` in between waits for its own ``qos-ok``, not for an earlier one."""
    t = rabbit.make()
    q = rabbit.queue()
    t.declare(q)
    for n in range(4):
        t.publish(env(n), exchange="", routing_key=q.name)
    t.consume([q], prefetch_count=10)
    got = poll_until(t, 4)
    t.ack_early(got[:2])
    assert t.unconfirmed_acks() == got[:2]
    t.ack_early(got[2:3])
    t.set_prefetch(8)
    assert t.unconfirmed_acks() == []  # answered in order, before set_prefetch's own
    t.ack_early(got[3:])
    assert t.unconfirmed_acks() == got[3:]
    assert t.poll(0.3) == []
    assert t.unconfirmed_acks() == []
    t.close()
    other = rabbit.make()
    assert other.queue_size(q.name) == 0  # all four acked, none given back


def test_reject_requeue_and_drop(rabbit: Rabbit) -> None:
    t = rabbit.make()
    q = rabbit.queue()
    t.declare(q)
    t.publish(env(1), exchange="", routing_key=q.name)
    t.consume([q], prefetch_count=1)
    (message,) = poll_until(t, 1)
    assert message.delivery_info["redelivered"] is False
    message.requeue()
    (again,) = poll_until(t, 1)
    assert again.headers["n"] == 1 and again.delivery_info["redelivered"] is True
    again.reject(requeue=False)
    assert t.poll(1.0) == []
    assert t.queue_size(q.name) == 0


def test_prefetch_bounds_what_poll_hands_out(rabbit: Rabbit) -> None:
    t = rabbit.make()
    q1, q2 = rabbit.queue(), rabbit.queue()
    for q in (q1, q2):
        t.declare(q)
        for n in range(5):
            t.publish(env(n), exchange="", routing_key=q.name)
    t.consume([q1, q2], prefetch_count=3)
    held = poll_until(t, 3)
    assert len(held) == 3
    for _ in range(3):
        assert t.poll(0.3) == [], "poll went past the prefetch bound"
    acked = [held.pop()]
    acked[0].ack()
    held.extend(poll_until(t, 1))
    assert len(held) == 3 and t.poll(0.3) == []
    t.set_prefetch(6)
    held.extend(poll_until(t, 3))
    assert len(held) == 6 and t.poll(0.3) == []
    for message in held:
        message.ack()
    rest = poll_until(t, 3)
    for message in rest:
        message.ack()
    everything = acked + held + rest
    assert sorted(m.headers["n"] for m in everything) == sorted(list(range(5)) * 2)


def test_priorities_on_a_classic_queue(rabbit: Rabbit) -> None:
    t = rabbit.make()
    q = rabbit.queue(max_priority=10)
    t.declare(q)
    for n, priority in enumerate([1, 9, 5, 0]):
        e = env(n)
        e.properties["priority"] = priority
        t.publish(e, exchange="", routing_key=q.name)
    t.consume([q])
    got = poll_until(t, 4)
    assert [m.delivery_info["priority"] for m in got] == [9, 5, 1, 0]
    for m in got:
        m.ack()


def test_fanout_and_topic_exchanges(rabbit: Rabbit) -> None:
    t = rabbit.make()
    fan = Exchange(rabbit.name("x"), "fanout")
    topic = Exchange(rabbit.name("x"), "topic")
    fq1, fq2 = (Queue(rabbit.name(), fan, "") for _ in range(2))
    tq_star = Queue(rabbit.name(), topic, "a.*")
    tq_hash = Queue(rabbit.name(), topic, "a.#")
    for q in (fq1, fq2, tq_star, tq_hash):
        t.declare(q)
    t.publish(env(1), exchange=fan.name, routing_key="anything")
    t.publish(env(2), exchange=topic.name, routing_key="a.b")
    t.publish(env(3), exchange=topic.name, routing_key="a.b.c")
    assert [t.queue_size(q.name) for q in (fq1, fq2, tq_star, tq_hash)] == [1, 1, 1, 2]
    with pytest.raises(PublishError, match="unroutable"):
        t.publish(env(4), exchange=topic.name, routing_key="b.c")


def test_unroutable_and_missing_exchange_raise_and_the_channel_survives(rabbit: Rabbit) -> None:
    t = rabbit.make()
    q = rabbit.queue()
    t.declare(q)
    with pytest.raises(PublishError, match="unroutable"):
        t.publish(env(1), exchange="", routing_key=rabbit.name())
    with pytest.raises(PublishError, match="NOT_FOUND"):
        t.publish(env(2), exchange=rabbit.name("x"), routing_key="k")
    t.publish(env(3), exchange="", routing_key=q.name)
    assert t.queue_size(q.name) == 1
    assert t.connected


def test_quorum_queue_and_inequivalent_redeclare(rabbit: Rabbit) -> None:
    t = rabbit.make()
    q = rabbit.queue(queue_type="quorum")
    t.declare(q)
    out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "name", "type"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert f"{q.name}\tquorum" in out
    t.publish(env(1), exchange="", routing_key=q.name)
    t.consume([q], prefetch_count=5)  # per-consumer QoS: quorum queues refuse global
    (message,) = poll_until(t, 1)
    message.ack()
    other = rabbit.make()
    with pytest.raises(TransportError, match="PRECONDITION_FAILED"):
        other.declare(Queue(q.name))  # classic now, quorum on the broker
    other.declare(q)  # the channel still works after the refusal


def test_purge_and_queue_size(rabbit: Rabbit) -> None:
    t = rabbit.make()
    q = rabbit.queue()
    t.declare(q)
    for n in range(7):
        t.publish(env(n), exchange="", routing_key=q.name)
    assert t.queue_size(q.name) == 7
    assert t.purge(q.name) == 7
    assert t.queue_size(q.name) == 0
    missing = rabbit.name()
    assert t.queue_size(missing) == 0 and t.purge(missing) == 0


def test_cancel_gives_back_buffered_messages(rabbit: Rabbit) -> None:
    t = rabbit.make()
    q = rabbit.queue()
    t.declare(q)
    for n in range(4):
        t.publish(env(n), exchange="", routing_key=q.name)
    t.consume([q], prefetch_count=0)
    got = poll_until(t, 4)
    got[0].ack()
    t.cancel(q.name)
    assert t.poll(0.5) == []
    for m in got[1:]:
        m.requeue()
    wait_for(lambda: t.queue_size(q.name) == 3, "the requeued messages")


def test_delay_waits_in_the_delayed_delivery_queues(rabbit: Rabbit) -> None:
    t = rabbit.make()
    q = rabbit.queue(queue_type="quorum")
    t.declare(q)
    assert t.supports_delay
    before = t.queue_size(level_name(2))
    t.publish(env(5, eta="2030-01-01T00:00:00+00:00"), exchange="", routing_key=q.name,
              delay=5)
    # 5 s = binary 101: the message waits 4 s in level 2, then 1 s in level 0.
    assert t.queue_size(level_name(2)) >= before + 1
    assert t.queue_size(q.name) == 0
    t.consume([q])
    (message,) = poll_until(t, 1)
    assert message.headers["n"] == 5
    assert message.headers["eta"] == "2030-01-01T00:00:00+00:00"
    assert message.delivery_info["routing_key"] == q.name
    assert message.delivery_info["delayed_routing_key"] == "0." * 25 + "1.0.1." + q.name
    assert message.delivery_info["exchange"].startswith("celery_delayed_")
    message.ack()


def test_republished_delayed_message_is_not_dropped_as_a_dead_letter_cycle(
    rabbit: Rabbit,
) -> None:
    t = rabbit.make()
    q = rabbit.queue(queue_type="quorum")
    t.declare(q)
    t.publish(env(1), exchange="", routing_key=q.name, delay=1)
    t.consume([q])
    (first,) = poll_until(t, 1)
    info = first.delivery_info
    assert "x-death" in first.headers
    # What the worker does with a far-future ETA: send it back, delayed, to where it came from.
    t.publish(first.to_envelope(), exchange=info["exchange"], routing_key=info["routing_key"],
              delay=1)
    first.ack()
    (second,) = poll_until(t, 1)
    assert second.delivery_info["routing_key"] == q.name
    key = second.delivery_info["delayed_routing_key"]
    assert key == "0." * 27 + "1." + q.name, "the delay prefix must be replaced, not stacked"
    # Sent again without a delay, it skips the ladder (and still reaches the queue).
    t.publish(second.to_envelope(), exchange=second.delivery_info["exchange"],
              routing_key=key)
    (third,) = poll_until(t, 1)
    assert third.headers["n"] == 1 and third.delivery_info["exchange"] == DELIVERY_EXCHANGE
    third.ack()
    assert len(second.headers["x-death"]) == len(first.headers["x-death"])
    second.ack()


def test_delay_on_a_topic_exchange_uses_celerys_bindings(rabbit: Rabbit) -> None:
    t = rabbit.make()
    topic = Exchange(rabbit.name("x"), "topic")
    q = Queue(rabbit.name(), topic, "jobs.high", queue_type="quorum")
    t.declare(q)
    t.publish(env(7), exchange=topic.name, routing_key="jobs.high", delay=1)
    t.consume([q])
    (message,) = poll_until(t, 1)
    assert message.headers["n"] == 7
    # Celery's final hop: celery_delayed_delivery -> the topic exchange -> the queue.
    assert message.delivery_info["exchange"] in (DELIVERY_EXCHANGE, level_name(0))
    message.ack()


def test_classic_queue_delays_are_published_now_unless_forced(rabbit: Rabbit) -> None:
    auto = rabbit.make()
    q = rabbit.queue()
    auto.declare(q)
    assert not auto.supports_delay and not auto.can_delay("", q.name)
    auto.publish(env(1), exchange="", routing_key=q.name, delay=30)
    assert auto.queue_size(q.name) == 1
    forced = rabbit.make(delayed_delivery=True)
    forced.declare(q)
    assert forced.supports_delay
    forced.publish(env(2), exchange="", routing_key=q.name, delay=1)
    forced.consume([q])
    got = poll_until(forced, 2)
    assert sorted(m.headers["n"] for m in got) == [1, 2]
    off = rabbit.make(delayed_delivery=False)
    assert not off.supports_delay


def test_delay_limits(rabbit: Rabbit) -> None:
    t = rabbit.make()
    q = rabbit.queue(queue_type="quorum")
    t.declare(q)
    with pytest.raises(PublishError, match="2\\*\\*28 - 1"):
        t.publish(env(1), exchange="", routing_key=q.name, delay=2.0**28)
    t.publish(env(2), exchange="", routing_key=q.name, delay=0.5)  # under 1 s: at once
    assert t.queue_size(q.name) == 1


def test_unreachable_broker_and_dropped_link(rabbit: Rabbit) -> None:
    with pytest.raises(BrokerConnectionError) as info:
        AMQPTransport("amqp://guest:guest@127.0.0.1:1//", {"connect_timeout": 2}).connect()
    assert not isinstance(info.value, ConnectionLost)
    with pytest.raises(BrokerConnectionError, match="ACCESS_REFUSED"):
        AMQPTransport("amqp://guest:wrong@127.0.0.1:5672//", {}).connect()
    with pytest.raises(BrokerConnectionError, match="SSL"):
        # amqps:// really speaks TLS (here to a plain listener, so the handshake fails).
        AMQPTransport("amqps://guest:guest@127.0.0.1:5672//", {"connect_timeout": 5}).connect()
    name = f"tf-test-{uuid.uuid4().hex}"
    t = rabbit.make(client_name=name)
    q = rabbit.queue()
    t.declare(q)
    t.consume([q])
    assert amqp_admin.close_connections(name) == 1
    with pytest.raises(ConnectionLost):
        poll_until(t, 1)
    assert not t.connected


def test_connection_recovers_through_ensure(rabbit: Rabbit) -> None:
    q = rabbit.queue()
    conn = Connection(rabbit.url)
    try:
        conn.ensure_connection(max_retries=1)
        conn.transport.declare(q)
        first = conn.transport
        conn.close()
        conn.ensure(lambda t: t.declare(q))  # a new connection declares again
        conn.ensure(lambda t: t.publish(env(1), exchange="", routing_key=q.name))
        assert conn.transport is not first
        assert conn.transport.queue_size(q.name) == 1
    finally:
        conn.close()


def test_a_negative_confirm_raises(rabbit: Rabbit) -> None:
    t = rabbit.make()
    q = rabbit.queue(arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    t.declare(q)
    t.publish(env(1), exchange="", routing_key=q.name)
    with pytest.raises(PublishError, match="nack"):
        t.publish(env(2), exchange="", routing_key=q.name)
    assert t.queue_size(q.name) == 1


def test_heartbeats_keep_an_idle_connection_alive(rabbit: Rabbit) -> None:
    # A 2 s heartbeat: RabbitMQ drops a peer that stays silent for two intervals, and
    # this test stays idle for longer than that.
    polling = rabbit.make(heartbeat=2)
    maintaining = rabbit.make(heartbeat=2)
    q = rabbit.queue()
    polling.declare(q)
    polling.consume([q])
    maintaining.declare(q)
    for _ in range(8):
        assert polling.poll(1.0) == []
        maintaining.maintain()  # the worker calls this every second
    publisher = rabbit.make()
    publisher.publish(env(1), exchange="", routing_key=q.name)
    (message,) = poll_until(polling, 1)
    message.ack()
    assert maintaining.queue_size(q.name) == 0
    assert polling.connected and maintaining.connected


def test_delays_only_go_where_a_binding_brings_them_back(rabbit: Rabbit) -> None:
    t = rabbit.make()
    topic = Exchange(rabbit.name("x"), "topic")
    q = Queue(rabbit.name(), topic, "work.*", queue_type="quorum")
    classic = Queue(rabbit.name(), topic, "work.#")
    t.declare(q)
    t.declare(classic)
    t.publish(env(1), exchange="", routing_key=q.name, delay=1)  # by name, not by pattern
    t.publish(env(2), exchange=topic.name, routing_key="work.x", delay=1)
    with pytest.raises(PublishError, match="unroutable"):
        # No declared binding matches, so no delay: sent now, and nobody takes it.
        t.publish(env(3), exchange=topic.name, routing_key="play.x", delay=1)
    t.consume([q, classic])
    got = poll_until(t, 3)
    assert sorted((m.delivery_info["queue"], m.headers["n"]) for m in got) == sorted(
        [(q.name, 1), (q.name, 2), (classic.name, 2)]
    )
    for m in got:
        assert m.delivery_info["exchange"].startswith("celery_delayed_")
        m.ack()


# -- failed deliveries and dead letters (amqp_failures) --------------------------------------


def _dead(rabbit: Rabbit, q: Queue) -> str:
    name = f"{q.name}.dead"
    rabbit.queues.append(name)
    return name


def test_quorum_queues_count_failed_deliveries_themselves(rabbit: Rabbit) -> None:
    q = rabbit.queue(queue_type="quorum")
    dead = _dead(rabbit, q)
    holder = rabbit.make()
    holder.declare(q)
    holder.publish(env(1), exchange="", routing_key=q.name)
    holder.consume([q])
    (message,) = poll_until(holder, 1)
    assert message.delivery_count == 1
    message.requeue_failed()  # basic.reject: RabbitMQ counts it
    (message,) = poll_until(holder, 1)
    assert message.delivery_count == 2 and message.headers["x-delivery-count"] == 1
    holder.close()  # a holder that goes away with it unacked: counted too
    other = rabbit.make()
    other.consume([q])
    (message,) = poll_until(other, 1)
    assert message.delivery_count == 3
    # No dead-letter exchange on the queue: a copy goes to <queue>.dead, then the ack.
    assert message.dead_letter() == dead
    wait_for(lambda: other.queue_size(dead) == 1, "the copy in the dead-letter queue")
    assert other.queue_size(q.name) == 0
    keeper = rabbit.make()
    keeper.consume([Queue(dead, queue_type="quorum")])
    (kept,) = poll_until(keeper, 1)
    assert kept.headers["n"] == 1 and kept.delivery_count == 1  # a new message there
    kept.ack()


def test_classic_queues_carry_our_count_in_a_copy(rabbit: Rabbit) -> None:
    q = rabbit.queue()
    dead = _dead(rabbit, q)
    t = rabbit.make()
    t.declare(q)
    t.publish(env(2), exchange="", routing_key=q.name)
    t.consume([q])
    (message,) = poll_until(t, 1)
    message.requeue_failed()  # a copy with our header, then the ack
    (message,) = poll_until(t, 1)
    assert message.delivery_count == 2
    assert message.headers == {"n": 2}  # the count is not one of the task's headers
    message.reject(requeue=True)  # basic.nack: not counted
    (message,) = poll_until(t, 1)
    assert message.delivery_count == 2
    message.requeue_failed()
    (message,) = poll_until(t, 1)
    assert message.delivery_count == 3
    assert message.dead_letter() == dead
    wait_for(lambda: t.queue_size(dead) == 1, "the copy in the dead-letter queue")
    assert t.queue_size(q.name) == 0


def test_delivery_limit_option_gives_quorum_queues_rabbitmqs_limit(
        rabbit: Rabbit, caplog: pytest.LogCaptureFixture) -> None:
    q = rabbit.queue(queue_type="quorum")
    dead = _dead(rabbit, q)
    t = rabbit.make(delivery_limit=2)
    t.declare(q)
    out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "name", "arguments"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    line = next(row for row in out.splitlines() if row.startswith(q.name + "\t"))
    assert "x-delivery-limit" in line and dead in line, line
    t.publish(env(3), exchange="", routing_key=q.name)
    t.consume([q])
    for count in (1, 2, 3):  # RabbitMQ dead-letters it itself on the third return
        (message,) = poll_until(t, 1)
        assert message.delivery_count == count
        message.requeue_failed()
    wait_for(lambda: t.queue_size(dead) == 1, "RabbitMQ to dead-letter it")
    assert t.queue_size(q.name) == 0
    t.publish(env(4), exchange="", routing_key=q.name)
    (message,) = poll_until(t, 1)
    assert message.dead_letter() == dead  # basic.reject: its dead-letter route
    wait_for(lambda: t.queue_size(dead) == 2, "the second dead letter")
    # Declared again without the limit, or with another: used as it is, with a warning.
    with caplog.at_level("WARNING", logger="taskframe.transport.amqp"):
        rabbit.make().declare(q)
        rabbit.make(delivery_limit=5).declare(q)
    warnings = [r.getMessage() for r in caplog.records if "used as it is" in r.getMessage()]
    assert len(warnings) == 2, caplog.text


def test_an_existing_quorum_queue_without_the_limit_keeps_working(
        rabbit: Rabbit, caplog: pytest.LogCaptureFixture) -> None:
    q = rabbit.queue(queue_type="quorum")
    dead = _dead(rabbit, q)
    rabbit.make().declare(q)  # as Celery (or taskframe before the option) declared it
    t = rabbit.make(delivery_limit=2)
    with caplog.at_level("WARNING", logger="taskframe.transport.amqp"):
        t.declare(q)
    assert "PRECONDITION_FAILED" in caplog.text and "used as it is" in caplog.text
    t.publish(env(5), exchange="", routing_key=q.name)  # the publishing channel works
    t.consume([q])
    (message,) = poll_until(t, 1)
    assert message.dead_letter() == dead  # no dead-letter exchange: a copy
    wait_for(lambda: t.queue_size(dead) == 1, "the copy in the dead-letter queue")
