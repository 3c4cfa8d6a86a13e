"""The Redis transport against a real Redis: kombu's layout, reliable delivery, delays, fanout.

Every test uses its own ``global_keyprefix`` on the shared server (so ``unacked`` and the
other shared keys are private to the test) and deletes its keys afterwards. Tests that stop
Redis start their own ``redis-server`` (``redisproj/redisserver.py``).
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import services

from taskframe.transport import Envelope, Exchange, Message, Queue
from taskframe.transport.errors import BrokerConnectionError, ConnectionLost
from taskframe.transport.redis import RedisTransport

sys.path.insert(0, str(Path(__file__).parent / "redisproj"))
from redisserver import RedisServer, spare_port

PATIENCE = 20.0  # generous guard so a broken transport fails instead of hanging
SEP = "\x06\x16"


@dataclass
class Broker:
    url: str
    prefix: str
    raw: redis.Redis
    made: list[RedisTransport] = field(default_factory=list)

    def make(self, **options: Any) -> RedisTransport:
        transport = RedisTransport(self.url, {"global_keyprefix": self.prefix, **options})
        transport.connect()
        self.made.append(transport)
        return transport

    def redis_keys(self) -> set[str]:
        return {k.decode() for k in self.raw.scan_iter(match=f"{self.prefix}*")}


@pytest.fixture
def broker() -> Iterator[Broker]:
    url = services.redis_url()
    raw = redis.Redis.from_url(url)
    b = Broker(url, f"tfr{uuid.uuid4().hex[:8]}.", raw)
    yield b
    for transport in b.made:
        transport.close()
    keys = list(raw.scan_iter(match=f"{b.prefix}*"))
    if keys:
        raw.delete(*keys)
    raw.close()


def qname() -> str:
    return f"q-{uuid.uuid4().hex[:8]}"


def envelope(n: int, **properties: Any) -> Envelope:
    return Envelope(body=json.dumps([n]).encode(), headers={"n": n}, properties=properties)


def receive(transport: RedisTransport, count: int) -> list[Message]:
    got: list[Message] = []
    deadline = time.monotonic() + PATIENCE
    while len(got) < count:
        assert time.monotonic() < deadline, f"received {len(got)} of {count}"
        got += transport.poll(0.2)
    return got


def kill_clients(raw: redis.Redis, name: str) -> int:
    """Close every connection of the server's clients named ``name``; return how many."""
    killed = 0
    for client in raw.client_list():
        if client.get("name") == name:
            raw.client_kill_filter(_id=client["id"])
            killed += 1
    return killed


def until(predicate: Callable[[], bool], what: str, step: Callable[[], Any] = lambda: None) -> None:
    deadline = time.monotonic() + PATIENCE
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        step()
        time.sleep(0.05)


def test_publish_poll_ack_in_kombus_envelope(broker: Broker) -> None:
    q = qname()
    producer = broker.make()
    producer.declare(Queue(q))
    producer.publish(envelope(1, correlation_id="abc", priority=0), exchange="", routing_key=q)
    stored = json.loads(broker.raw.lindex(broker.prefix + q, 0) or b"")
    assert list(stored) == ["body", "content-encoding", "content-type", "headers", "properties"]
    assert base64.b64decode(stored["body"]) == b"[1]"
    props = stored["properties"]
    assert props["correlation_id"] == "abc"
    assert props["delivery_info"] == {"exchange": "", "routing_key": q}
    assert props["body_encoding"] == "base64"
    assert uuid.UUID(props["delivery_tag"])
    assert producer.queue_size(q) == 1
    # kombu's binding of the queue to its direct exchange, and 5.7's permanent set.
    member = f"{q}{SEP}{SEP}{q}".encode()
    assert broker.raw.smembers(f"{broker.prefix}_kombu.binding.{q}") == {member}
    assert broker.raw.smembers(f"{broker.prefix}_kombu.binding_permanent.{q}") == {member}

    consumer = broker.make()
    consumer.consume([Queue(q)])
    [message] = receive(consumer, 1)
    assert (message.body, message.headers, message.properties["correlation_id"]) == (
        b"[1]", {"n": 1}, "abc")
    assert message.delivery_tag == props["delivery_tag"]
    assert message.delivery_info["queue"] == q
    # Held: recorded in kombu's unacked hash and index.
    unacked = json.loads(broker.raw.hget(broker.prefix + "unacked", message.delivery_tag) or b"")
    assert unacked == [stored, "", q]
    assert broker.raw.zscore(broker.prefix + "unacked_index", message.delivery_tag) is not None
    message.ack()
    assert broker.raw.hlen(broker.prefix + "unacked") == 0
    assert broker.raw.zcard(broker.prefix + "unacked_index") == 0
    assert consumer.queue_size(q) == 0


def test_batched_acks_go_with_the_next_claim_or_on_their_own(broker: Broker) -> None:
    q = qname()
    consumer = broker.make()
    consumer.declare(Queue(q))
    consumer.consume([Queue(q)])
    unacked, index = broker.prefix + "unacked", broker.prefix + "unacked_index"

    def held_in_redis() -> set[str]:
        return {k.decode() for k in broker.raw.hkeys(unacked)}

    for n in range(4):
        consumer.publish(envelope(n), exchange="", routing_key=q)
    first = receive(consumer, 4)
    consumer.ack_many(first[:3])
    assert all(m.settled for m in first[:3])
    # Not sent yet: they ride on the next claim, in its script (one round trip).
    assert held_in_redis() == {str(m.delivery_tag) for m in first}
    consumer.publish(envelope(4), exchange="", routing_key=q)
    [fifth] = receive(consumer, 1)
    assert held_in_redis() == {str(first[3].delivery_tag), str(fifth.delivery_tag)}
    assert broker.raw.zcard(index) == 2
    consumer.ack_many([first[3], fifth])
    assert consumer.poll(0.05) == []  # an empty claim carries them
    assert held_in_redis() == set()

    # Or they go on their own: from a poll that cannot claim (prefetch full), from
    # maintain() and from close().
    def ack_two_then(settle: Callable[[], Any], keep: int = 0) -> None:
        for n in range(2 + keep):
            consumer.publish(envelope(n), exchange="", routing_key=q)
        got = receive(consumer, 2 + keep)
        consumer.ack_many(got[:2])
        settle()
        assert held_in_redis() == {str(m.delivery_tag) for m in got[2:]}
        assert broker.raw.zcard(index) == keep
        for message in got[2:]:
            message.ack()

    def poll_when_full() -> None:
        consumer.set_prefetch(1)  # one message still held: no room, no claim
        assert consumer.poll(0.05) == []
        consumer.set_prefetch(0)

    ack_two_then(poll_when_full, keep=1)
    ack_two_then(consumer.maintain)
    ack_two_then(consumer.close)
    assert broker.raw.llen(broker.prefix + q) == 0  # acked, not given back


def test_early_acks_are_written_at_once_and_their_replies_read_later(
        broker: Broker, caplog: pytest.LogCaptureFixture) -> None:
    """``ack_early``: Redis has the acks before the call returns (the body may start);
    the reply is read at the next claim. A reply lost with its connection leaves the acks
    due, and the reconnect writes them again: nothing is restored, nothing warned."""
    q = qname()
    consumer = broker.make(client_name=f"tf-{broker.prefix}")
    consumer.consume([Queue(q)])
    unacked = broker.prefix + "unacked"
    for n in range(3):
        consumer.publish(envelope(n), exchange="", routing_key=q)
    got = receive(consumer, 3)
    consumer.ack_early(got[:2])
    assert all(m.settled for m in got[:2])
    until(lambda: broker.raw.hlen(unacked) == 1, "the early acks to land, unread")
    assert {k.decode() for k in broker.raw.hkeys(unacked)} == {str(got[2].delivery_tag)}
    assert consumer.poll(0.05) == []  # reads the reply
    assert broker.raw.zcard(broker.prefix + "unacked_index") == 1

    # The connection of the early acks dies with them unprocessed (writes are paused): the
    # next poll fails (the link counts as lost), and connect() writes the acks again.
    for n in range(2):
        consumer.publish(envelope(10 + n), exchange="", routing_key=q)
    more = receive(consumer, 2)
    with caplog.at_level("WARNING", logger="taskframe.transport.redis"):
        broker.raw.execute_command("CLIENT", "PAUSE", "10000", "WRITE")
        try:
            consumer.ack_early([got[2], *more])
            time.sleep(0.2)
            assert broker.raw.hlen(unacked) == 3  # written, not done
            assert kill_clients(broker.raw, f"tf-{broker.prefix}") >= 1
        finally:
            broker.raw.execute_command("CLIENT", "UNPAUSE")
        assert broker.raw.hlen(unacked) == 3  # died with the connection
        with pytest.raises(ConnectionLost):
            consumer.poll(0.05)
        consumer.drop()
        consumer.connect()
        assert consumer.poll(0.05) == []
    assert broker.raw.hlen(unacked) == 0 and broker.raw.llen(broker.prefix + q) == 0
    assert "no longer held" not in caplog.text


def test_an_ack_of_a_message_restored_meanwhile_warns(broker: Broker,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    q = qname()
    consumer = broker.make()
    consumer.declare(Queue(q))
    consumer.consume([Queue(q)])
    for n in range(2):
        consumer.publish(envelope(n), exchange="", routing_key=q)
    pair = receive(consumer, 2)
    broker.raw.hdel(broker.prefix + "unacked", str(pair[0].delivery_tag))  # as a restore does
    consumer.ack_many(pair)
    consumer.publish(envelope(2), exchange="", routing_key=q)
    with caplog.at_level("WARNING", logger="taskframe.transport.redis"):
        receive(consumer, 1)
    assert [r.getMessage() for r in caplog.records if "no longer held" in r.getMessage()] \
        and str(pair[0].delivery_tag) in caplog.text


def test_reject_with_and_without_requeue(broker: Broker) -> None:
    q = qname()
    transport = broker.make()
    transport.consume([Queue(q)])
    for n in range(3):
        transport.publish(envelope(n), exchange="", routing_key=q)
    first, second, third = receive(transport, 3)
    assert [first.body, second.body, third.body] == [b"[0]", b"[1]", b"[2]"]
    transport.publish(envelope(3), exchange="", routing_key=q)
    first.reject(requeue=False)
    second.reject(requeue=True)
    third.ack()
    again = receive(transport, 2)
    # A requeued message goes to the back of its queue, flagged as redelivered (as kombu).
    assert [m.body for m in again] == [b"[3]", b"[1]"]
    assert again[1].delivery_info["redelivered"] is True
    assert again[1].headers["redelivered"] is True
    for m in again:
        m.ack()
    assert transport.queue_size(q) == 0
    assert broker.raw.hlen(broker.prefix + "unacked") == 0


def test_failed_deliveries_ride_in_the_envelope(broker: Broker) -> None:
    q = qname()
    transport = broker.make()
    transport.consume([Queue(q)])
    transport.publish(envelope(1), exchange="", routing_key=q)
    [message] = receive(transport, 1)
    assert message.delivery_count == 1
    message.requeue_failed()
    raw = json.loads(broker.raw.lindex(broker.prefix + q, 0) or b"{}")
    # A property kombu and Celery carry along and ignore; not among the message's own.
    assert raw["properties"]["x-taskframe-failed-deliveries"] == 1
    [message] = receive(transport, 1)
    assert message.delivery_count == 2
    assert "x-taskframe-failed-deliveries" not in message.properties
    message.reject(requeue=True)  # a plain requeue keeps the count
    [message] = receive(transport, 1)
    assert message.delivery_count == 2
    transport.close()  # and so does the give-back on close
    again = broker.make()
    again.consume([Queue(q)])
    [message] = receive(again, 1)
    assert message.delivery_count == 2
    assert message.dead_letter() == f"{q}.dead"
    assert broker.raw.hlen(broker.prefix + "unacked") == 0
    # kombu's list of queue <q>.dead, the count dropped: consumed, it runs again.
    raw = json.loads(broker.raw.lindex(broker.prefix + f"{q}.dead", 0) or b"{}")
    assert raw["body"] == base64.b64encode(b"[1]").decode()
    assert "x-taskframe-failed-deliveries" not in raw["properties"]
    dead = broker.make()
    dead.consume([Queue(f"{q}.dead")])
    [kept] = receive(dead, 1)
    assert kept.body == b"[1]" and kept.delivery_count == 1
    kept.ack()


def test_a_failed_delivery_or_dead_letter_waits_for_the_link(broker: Broker) -> None:
    q = qname()
    transport = broker.make()
    transport.consume([Queue(q)])
    for n in range(2):
        transport.publish(envelope(n), exchange="", routing_key=q)
    first, second = receive(transport, 2)
    transport.drop()  # the link failed: both stay held, their settles wait
    first.requeue_failed()
    assert second.dead_letter() == f"{q}.dead"
    transport.connect()  # written now, as they were asked
    [again] = receive(transport, 1)
    assert again.body == first.body and again.delivery_count == 2
    again.ack()
    assert transport.queue_size(f"{q}.dead") == 1


def test_prefetch_bounds_held_messages(broker: Broker) -> None:
    q = qname()
    transport = broker.make()
    transport.consume([Queue(q)], prefetch_count=3)
    for n in range(10):
        transport.publish(envelope(n), exchange="", routing_key=q)
    held = receive(transport, 3)
    assert len(held) == 3
    assert transport.poll(0.3) == []
    held[0].ack()
    [fourth] = receive(transport, 1)
    assert fourth.body == b"[3]"
    transport.set_prefetch(0)
    rest = receive(transport, 6)
    assert [m.body for m in rest] == [f"[{n}]".encode() for n in range(4, 10)]


def test_priorities_use_kombus_lists_lower_first(broker: Broker) -> None:
    q = qname()
    transport = broker.make()
    for n, priority in enumerate([0, 5, 1, 9, 5, 3, 8]):
        transport.publish(envelope(n, priority=priority), exchange="", routing_key=q)
    keys = {k for k in broker.redis_keys() if k.startswith(broker.prefix + q)}
    assert keys == {broker.prefix + q + suffix for suffix in ("", f"{SEP}3", f"{SEP}6", f"{SEP}9")}
    assert broker.raw.llen(f"{broker.prefix}{q}{SEP}3") == 3  # 5, 5, 3 -> step 3
    transport.consume([Queue(q)])
    received = receive(transport, 7)
    assert [m.delivery_info["priority"] for m in received] == [0, 1, 5, 5, 3, 8, 9]
    assert transport.queue_size(q) == 0


def test_direct_and_topic_exchanges_route_through_kombus_binding_tables(broker: Broker) -> None:
    a, b = qname(), qname()
    transport = broker.make()
    topic = Exchange("tf-topic", type="topic")
    transport.declare(Queue(a, exchange=topic, routing_key="job.*"))
    transport.declare(Queue(b, exchange=topic, routing_key="job.#"))
    members = broker.raw.smembers(f"{broker.prefix}_kombu.binding.tf-topic")
    assert f"job.*{SEP}^job\\.[^\\.]+${SEP}{a}".encode() in members
    transport.publish(envelope(1), exchange="tf-topic", routing_key="job.x")
    transport.publish(envelope(2), exchange="tf-topic", routing_key="job.x.y")
    assert (transport.queue_size(a), transport.queue_size(b)) == (1, 2)
    direct = Exchange("tf-direct")
    transport.declare(Queue(a, exchange=direct, routing_key="k"))
    transport.publish(envelope(3), exchange="tf-direct", routing_key="k")
    transport.publish(envelope(4), exchange="tf-direct", routing_key="nobody")
    assert transport.queue_size(a) == 2
    transport.consume([Queue(a), Queue(b)])
    got = receive(transport, 4)
    # Each copy has its own delivery tag, so the two copies are settled apart.
    assert len({m.delivery_tag for m in got}) == 4
    for m in got:
        m.ack()
    assert broker.raw.hlen(broker.prefix + "unacked") == 0


def test_fanout_reaches_every_live_subscriber(broker: Broker) -> None:
    exchange = Exchange("tf-bcast", type="fanout", durable=False)
    one, two = broker.make(), broker.make()
    one.consume([Queue(qname(), exchange=exchange, routing_key="")])
    two.consume([Queue(qname(), exchange=exchange, routing_key="")])
    listener = broker.raw.pubsub()
    listener.psubscribe(f"{broker.prefix}/0.tf-bcast")
    producer = broker.make()
    producer.declare_exchange(exchange)
    producer.publish(envelope(7), exchange="tf-bcast", routing_key="")
    for transport in (one, two):
        [message] = receive(transport, 1)
        assert message.body == b"[7]"
        message.ack()  # nothing is held for a fanout message: a no-op
    until(lambda: _pmessage(listener), "the PUBLISH on kombu's channel name")
    listener.close()
    assert broker.raw.hlen(broker.prefix + "unacked") == 0


def _pmessage(listener: Any) -> bool:
    item = listener.get_message(timeout=0.1)
    return item is not None and item["type"] == "pmessage"


def test_delay_keeps_the_message_in_the_sorted_set_until_due(broker: Broker) -> None:
    q = qname()
    transport = broker.make()
    transport.consume([Queue(q)])
    transport.publish(envelope(1), exchange="", routing_key=q, delay=600.0)
    transport.publish(envelope(2), exchange="", routing_key=q, delay=1.0)
    assert broker.raw.zcard(broker.prefix + "taskframe.delayed") == 2
    assert transport.queue_size(q) == 0
    [message] = receive(transport, 1)
    assert message.body == b"[2]"
    message.ack()
    # The far one waits in the sorted set: not in the list, not held by anyone.
    assert broker.raw.zcard(broker.prefix + "taskframe.delayed") == 1
    assert transport.queue_size(q) == 0
    assert broker.raw.hlen(broker.prefix + "unacked") == 0


_HOLDER = textwrap.dedent("""
    import sys, time
    from taskframe.transport import Queue
    from taskframe.transport.redis import RedisTransport
    t = RedisTransport(sys.argv[1], {"global_keyprefix": sys.argv[2], "visibility_timeout": 1.5})
    t.connect()
    t.consume([Queue(sys.argv[3])])
    got = []
    while not got:
        got = t.poll(0.2)
    print("held", got[0].delivery_tag, flush=True)
    time.sleep(600)
""")


def test_restore_after_visibility_timeout_when_the_holder_vanishes(broker: Broker) -> None:
    q = qname()
    producer = broker.make()
    producer.publish(envelope(5), exchange="", routing_key=q)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, broker.url, broker.prefix, q],
                              stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None
        line = holder.stdout.readline().decode().split()
        assert line[0] == "held"
        holder.kill()
        holder.wait()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert broker.raw.hexists(broker.prefix + "unacked", line[1])
    rescuer = broker.make(visibility_timeout=1.5)
    rescuer.consume([Queue(q)])
    got: list[Message] = []

    def step() -> None:
        rescuer.maintain()
        got.extend(rescuer.poll(0.1))

    until(lambda: bool(got), "the restored message", step)
    [message] = got
    assert message.body == b"[5]"
    assert message.delivery_info["redelivered"] is True
    assert message.delivery_count == 2  # its holder died: a failed delivery
    message.ack()
    assert broker.raw.hlen(broker.prefix + "unacked") == 0


def test_maintain_keeps_the_claims_of_a_live_holder(broker: Broker) -> None:
    q = qname()
    holder = broker.make(visibility_timeout=3.0)
    holder.consume([Queue(q)])
    holder.publish(envelope(1), exchange="", routing_key=q)
    [held] = receive(holder, 1)
    other = broker.make(visibility_timeout=3.0, unacked_restore_interval=0.1)
    other.consume([Queue(q)])
    stolen: list[Message] = []
    deadline = time.monotonic() + 9.0  # three visibility timeouts
    while time.monotonic() < deadline:
        holder.maintain()
        other.maintain()
        stolen += other.poll(0.1)
    assert stolen == []
    held.ack()
    assert broker.raw.hlen(broker.prefix + "unacked") == 0


def test_purge_and_queue_size_count_every_priority_list(broker: Broker) -> None:
    q = qname()
    transport = broker.make()
    assert transport.queue_size(q) == 0
    for n, priority in enumerate([0, 4, 9, 9]):
        transport.publish(envelope(n, priority=priority), exchange="", routing_key=q)
    assert transport.queue_size(q) == 4
    assert transport.purge(q) == 4
    assert transport.queue_size(q) == 0
    assert not [k for k in broker.redis_keys() if k.startswith(broker.prefix + q)]


def test_close_gives_held_messages_back_to_the_front(broker: Broker) -> None:
    q = qname()
    transport = broker.make()
    transport.consume([Queue(q)], prefetch_count=1)
    transport.publish(envelope(1), exchange="", routing_key=q)
    transport.publish(envelope(2), exchange="", routing_key=q)
    [first] = receive(transport, 1)
    transport.close()
    again = broker.make()
    again.consume([Queue(q)])
    got = receive(again, 2)
    assert [m.body for m in got] == [first.body, b"[2]"]
    assert got[0].delivery_info["redelivered"] is True


def test_a_killed_client_connection_is_replaced_without_losing_messages(broker: Broker) -> None:
    q = qname()
    transport = broker.make(client_name=f"tf-{broker.prefix}")
    transport.consume([Queue(q)])
    transport.publish(envelope(1), exchange="", routing_key=q)
    [held] = receive(transport, 1)
    assert kill_clients(broker.raw, f"tf-{broker.prefix}") >= 1
    # redis-py opens a fresh socket for the next command: nothing to recover.
    held.ack()
    transport.publish(envelope(2), exchange="", routing_key=q)
    [message] = receive(transport, 1)
    assert message.body == b"[2]"
    message.ack()
    assert broker.raw.hlen(broker.prefix + "unacked") == 0


def test_a_stalled_server_raises_connection_lost_after_socket_timeout(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    transport = RedisTransport(server.url, {"socket_timeout": 1.0})
    try:
        transport.connect()
        q = qname()
        transport.consume([Queue(q)])
        assert transport.poll(0.05) == []
        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)  # the socket stays open, nothing answers
        try:
            with pytest.raises(ConnectionLost):
                transport.poll(0.5)
            transport.close()
        finally:
            server.proc.send_signal(signal.SIGCONT)
        fresh = RedisTransport(server.url, {"socket_timeout": 1.0})
        fresh.connect()
        fresh.consume([Queue(q)])
        fresh.publish(envelope(3), exchange="", routing_key=q)
        [message] = receive(fresh, 1)
        message.ack()
        fresh.close()
    finally:
        transport.close()
        server.stop()


def test_server_restart_loses_no_held_message(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    made: list[RedisTransport] = []
    try:
        options = {"visibility_timeout": 1.5, "socket_timeout": 2.0}
        transport = RedisTransport(server.url, options)
        transport.connect()
        made.append(transport)
        q = qname()
        transport.consume([Queue(q)])
        for n in range(3):
            transport.publish(envelope(n), exchange="", routing_key=q)
        held = receive(transport, 3)
        assert len(held) == 3
        server.stop()
        held[0].ack()  # waits for the link, which never comes back to this transport
        transport.close()  # returns on the dead link (a hang would hang this test)
        assert not transport.connected
        with pytest.raises(BrokerConnectionError):
            RedisTransport(server.url, options).connect()
        server.start()
        fresh = RedisTransport(server.url, options)
        fresh.connect()
        made.append(fresh)
        fresh.consume([Queue(q)])
        got: list[Message] = []

        def step() -> None:
            fresh.maintain()
            got.extend(fresh.poll(0.1))

        until(lambda: len(got) >= 3, "the three held messages, restored", step)
        assert sorted(m.body for m in got) == [b"[0]", b"[1]", b"[2]"]
    finally:
        for transport in made:
            transport.close()
        server.stop()


def test_held_messages_survive_a_restart_on_the_same_transport(tmp_path: Path) -> None:
    """A delivery belongs to the transport, not to its socket: an ack and a requeue made
    while Redis is down are written when the same transport connects again, and the
    message still held can be acked then (``keeps_deliveries``)."""
    server = RedisServer(tmp_path)
    server.start()
    transport = RedisTransport(server.url, {"visibility_timeout": 3600, "socket_timeout": 2.0})
    try:
        transport.connect()
        q = qname()
        transport.consume([Queue(q)])
        for n in range(3):
            transport.publish(envelope(n), exchange="", routing_key=q)
        held = sorted(receive(transport, 3), key=lambda m: m.body)
        server.stop()
        held[0].ack()
        held[1].requeue()
        with pytest.raises(ConnectionLost):
            transport.poll(0.1)
        transport.drop()
        server.start()
        transport.connect()
        admin = redis.Redis.from_url(server.url)
        assert admin.hkeys("unacked") == [str(held[2].delivery_tag).encode()]
        assert admin.llen(q) == 1
        held[2].ack()
        assert admin.hlen("unacked") == 0
        back = receive(transport, 1)
        assert [m.body for m in back] == [b"[1]"]
        back[0].ack()
        admin.close()
    finally:
        transport.close()
        server.stop()


def test_a_claim_whose_reply_was_lost_is_given_back_on_reconnect(tmp_path: Path) -> None:
    """The claim script ran but its reply never came (here: the server sleeps past the
    socket timeout, then runs the script the dead link had sent). What it took is in
    ``unacked`` under a tag nobody knows; the reconnect gives it back at once (before: it
    stayed there for the visibility timeout, an hour here)."""
    server = RedisServer(tmp_path, extra_args=("--enable-debug-command", "yes"))
    server.start()
    options = {"visibility_timeout": 3600, "socket_timeout": 1.0, "wake_ups": False}
    transport = RedisTransport(server.url, options)
    admin = redis.Redis.from_url(server.url)
    try:
        transport.connect()
        q = qname()
        transport.consume([Queue(q)])
        assert transport.poll(0) == []  # loads the scripts, and the claim is next to run
        for n in range(3):
            transport.publish(envelope(n), exchange="", routing_key=q)
        sleeper = threading.Thread(target=admin.execute_command, args=("DEBUG", "SLEEP", 2))
        sleeper.start()
        time.sleep(0.1)
        with pytest.raises(ConnectionLost):
            transport.poll(0.1)
        sleeper.join()
        until(lambda: admin.hlen("unacked") == 3, "the script the dead link sent to run")
        assert admin.llen(q) == 0
        transport.drop()
        transport.connect()
        assert (admin.hlen("unacked"), admin.llen(q)) == (0, 3)
        got = receive(transport, 3)
        assert sorted(m.body for m in got) == [b"[0]", b"[1]", b"[2]"]
        for message in got:
            message.ack()
    finally:
        transport.close()
        admin.close()
        server.stop()


def test_unix_socket_url_with_a_database_number(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, unix_socket=True)
    server.start()
    try:
        url = f"redis+socket://{server.socket_path}?virtual_host=3"
        transport = RedisTransport(url, {})
        transport.connect()
        q = qname()
        transport.consume([Queue(q)])
        transport.publish(envelope(4), exchange="", routing_key=q)
        [message] = receive(transport, 1)
        message.ack()
        transport.close()
        probe = redis.Redis(port=server.port, db=3)
        assert probe.exists(f"_kombu.binding.{q}") == 1
        probe.close()
    finally:
        server.stop()


def test_password_from_the_url_and_a_refused_one(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, extra_args=("--requirepass", "s3cret"))
    server.start()
    try:
        wrong = RedisTransport(f"redis://:nope@127.0.0.1:{server.port}/1", {})
        with pytest.raises(BrokerConnectionError):
            wrong.connect()
        assert not wrong.connected
        right = RedisTransport(f"redis://default:s3cret@127.0.0.1:{server.port}/1", {})
        right.connect()
        q = qname()
        right.publish(envelope(1), exchange="", routing_key=q)
        assert right.queue_size(q) == 1
        right.close()
    finally:
        server.stop()


def test_garbage_in_a_queue_is_handed_on_as_unreadable_and_can_be_rejected(
    broker: Broker,
) -> None:
    q = qname()
    broker.raw.lpush(broker.prefix + q, b"\x00not json at all")
    transport = broker.make()
    transport.consume([Queue(q)])
    [message] = receive(transport, 1)
    assert message.content_type == "application/x-taskframe-unreadable"
    assert message.body == b"\x00not json at all"
    assert broker.raw.hlen(broker.prefix + "unacked") == 1  # held like any other
    message.reject(requeue=False)
    assert broker.raw.hlen(broker.prefix + "unacked") == 0
    assert transport.queue_size(q) == 0


def test_expiring_queues_keep_kombu_57s_binding_deadline_and_list_ttl(broker: Broker) -> None:
    q = qname()
    transport = broker.make()
    queue = Queue(q, exchange=Exchange("tf-replies", durable=False), routing_key=q,
                  arguments={"x-expires": 10_000})
    transport.declare(queue)
    deadline = broker.raw.zscore(broker.prefix + "_kombu.binding_deadlines", "tf-replies")
    assert deadline is not None and deadline > time.time() * 1000
    assert not broker.raw.exists(broker.prefix + "_kombu.binding_permanent.tf-replies")
    transport.publish(envelope(1), exchange="tf-replies", routing_key=q)
    assert 0 < broker.raw.pttl(broker.prefix + q) <= 10_000


def test_sentinel_url_finds_the_master(tmp_path: Path) -> None:
    master = RedisServer(tmp_path)
    master.start()
    sentinel_port = spare_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {sentinel_port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor tfmaster 127.0.0.1 {master.port} 1\n"
    )
    sentinel = subprocess.Popen([master.binary, str(conf), "--sentinel"],
                                stdout=(tmp_path / "sentinel.log").open("wb"),
                                stderr=subprocess.STDOUT)
    try:
        url = f"sentinel://127.0.0.1:{sentinel_port}/2"
        transport = RedisTransport(url, {"master_name": "tfmaster"})
        until(lambda: _connects(transport), "the sentinel to answer")
        q = qname()
        transport.consume([Queue(q)])
        transport.publish(envelope(8), exchange="", routing_key=q)
        [message] = receive(transport, 1)
        assert message.body == b"[8]"
        message.ack()
        transport.close()
        probe = redis.Redis(port=master.port, db=2)
        assert probe.exists(f"_kombu.binding.{q}") == 1
        probe.close()
    finally:
        sentinel.terminate()
        sentinel.wait(timeout=30)
        master.stop()


def _connects(transport: RedisTransport) -> bool:
    try:
        transport.connect()
    except BrokerConnectionError:
        return False
    return True


def _tracking_clients(broker: Broker, name: str) -> list[dict[str, Any]]:
    return [c for c in broker.raw.client_list() if c.get("name") == name and "t" in c["flags"]]


def test_an_idle_consumer_is_woken_by_invalidation_pushes_or_polls(broker: Broker) -> None:
    q = qname()
    name = f"tf-wake-{broker.prefix}"
    woken = broker.make(client_name=name)
    # Overlapping queue names: the waker merges prefixes that Redis would refuse.
    woken.consume([Queue(q), Queue(q + "x")])
    assert woken.poll(0.05) == []
    assert len(_tracking_clients(broker, name)) == 1
    broker.raw.lpush(broker.prefix + q, _kombu_like(q))
    [message] = receive(woken, 1)
    # Busy again: pushes are off, so none pile up in the server for this connection.
    assert _tracking_clients(broker, name) == []
    message.ack()

    polling_name = f"tf-poll-{broker.prefix}"
    polling = broker.make(client_name=polling_name, wake_ups=False)
    polling.consume([Queue(q)])
    assert polling.poll(0.05) == []
    assert _tracking_clients(broker, polling_name) == []
    polling.publish(envelope(2), exchange="", routing_key=q)
    [message] = receive(polling, 1)
    assert message.body == b"[2]"
    message.ack()


def _kombu_like(q: str) -> str:
    return json.dumps({
        "body": base64.b64encode(b"[1]").decode(), "content-encoding": "utf-8",
        "content-type": "application/json", "headers": {},
        "properties": {"delivery_info": {"exchange": "", "routing_key": q}, "priority": 0,
                       "body_encoding": "base64", "delivery_tag": str(uuid.uuid4())},
    })
