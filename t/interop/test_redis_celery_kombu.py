"""kombu 5.7's Redis transport and ours agree on held messages, priorities and fanout.

* A message held by a dead kombu consumer is restored by our ``restore_expired``, and one
  held by a dead taskframe consumer is restored by kombu's ``restore_visible``.
* Priorities published by either side are consumed in the same order by the other.
* A fanout publish by either side reaches the other's subscriber.

Holders die for real (``kill -9`` of a subprocess). Each test has its own
``global_keyprefix`` on the shared Redis, deleted afterwards.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from typing import Any

import kombu
import pytest
import redis
import services

from taskframe.transport import Envelope, Exchange, Message, Queue
from taskframe.transport.redis import RedisTransport

pytestmark = pytest.mark.interop

PATIENCE = 20.0


@pytest.fixture
def prefix() -> Iterator[str]:
    value = f"tfk{uuid.uuid4().hex[:8]}."
    yield value
    client = redis.Redis.from_url(services.redis_url())
    keys = list(client.scan_iter(match=f"{value}*"))
    if keys:
        client.delete(*keys)
    client.close()


def ours(prefix: str, **options: Any) -> RedisTransport:
    transport = RedisTransport(services.redis_url(), {"global_keyprefix": prefix, **options})
    transport.connect()
    return transport


def theirs(prefix: str, **options: Any) -> kombu.Connection:
    return kombu.Connection(services.redis_url(),
                            transport_options={"global_keyprefix": prefix, **options})


def receive(transport: RedisTransport, count: int) -> list[Message]:
    got: list[Message] = []
    deadline = time.monotonic() + PATIENCE
    while len(got) < count:
        assert time.monotonic() < deadline, f"received {len(got)} of {count}"
        transport.maintain()
        got += transport.poll(0.2)
    return got


def _hold_and_die(script: str, *args: str) -> str:
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args],
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().split()
        assert line and line[0] == "held", line
    finally:
        proc.kill()
        proc.wait()
    return line[1]


_KOMBU_HOLDER = """
    import sys, kombu
    conn = kombu.Connection(sys.argv[1], transport_options={"global_keyprefix": sys.argv[2]})
    queue = conn.SimpleQueue(sys.argv[3])
    message = queue.get(timeout=20)
    print("held", message.delivery_tag, flush=True)
    import time; time.sleep(600)
"""

_OUR_HOLDER = """
    import sys
    from taskframe.transport import Queue
    from taskframe.transport.redis import RedisTransport
    t = RedisTransport(sys.argv[1], {"global_keyprefix": sys.argv[2]})
    t.connect()
    t.consume([Queue(sys.argv[3])])
    got = []
    while not got:
        got = t.poll(0.2)
    print("held", got[0].delivery_tag, flush=True)
    import time; time.sleep(600)
"""


def test_we_restore_what_a_dead_kombu_consumer_held(prefix: str) -> None:
    q = f"k-{uuid.uuid4().hex[:6]}"
    with theirs(prefix) as conn:
        conn.SimpleQueue(q).put({"n": 1})
    tag = _hold_and_die(_KOMBU_HOLDER, services.redis_url(), prefix, q)
    raw = redis.Redis.from_url(services.redis_url())
    assert raw.hexists(prefix + "unacked", tag)
    transport = ours(prefix, visibility_timeout=1.0, unacked_restore_interval=0.2)
    try:
        transport.consume([Queue(q)])
        [message] = receive(transport, 1)
        assert message.decode() == {"n": 1}
        assert message.delivery_info["redelivered"] is True
        message.ack()
        assert raw.hlen(prefix + "unacked") == 0
    finally:
        transport.close()
        raw.close()


def test_kombu_restores_what_a_dead_taskframe_consumer_held(prefix: str) -> None:
    q = f"k-{uuid.uuid4().hex[:6]}"
    producer = ours(prefix)
    producer.publish(Envelope(body=b'{"n": 2}'), exchange="", routing_key=q)
    producer.close()
    tag = _hold_and_die(_OUR_HOLDER, services.redis_url(), prefix, q)
    time.sleep(1.5)  # past kombu's visibility timeout below
    with theirs(prefix, visibility_timeout=1) as conn:
        channel = conn.default_channel
        channel.qos.restore_visible(num=100)
        queue = conn.SimpleQueue(q)
        message = queue.get(timeout=PATIENCE)
        assert message.delivery_tag == tag
        assert message.payload == {"n": 2}
        message.ack()
        queue.close()


def test_priorities_mean_the_same_to_both(prefix: str) -> None:
    q = f"k-{uuid.uuid4().hex[:6]}"
    priorities = [9, 0, 5, 3, 7, 0]
    expected = [0, 0, 5, 3, 7, 9]  # kombu's steps: 0, 3 (5 and 3, in order), 6, 9
    with theirs(prefix) as conn:
        producer = conn.Producer()
        for p in priorities:
            producer.publish({"p": p}, routing_key=q, priority=p, declare=[kombu.Queue(q)])
    transport = ours(prefix)
    try:
        transport.consume([Queue(q)])
        got = receive(transport, len(priorities))
        assert [m.decode()["p"] for m in got] == expected
        for m in got:
            m.ack()
        for p in priorities:
            transport.publish(Envelope(body=f'{{"p": {p}}}'.encode(), properties={"priority": p}),
                              exchange="", routing_key=q)
    finally:
        transport.close()
    with theirs(prefix) as conn:
        queue = conn.SimpleQueue(q)
        seen = []
        for _ in priorities:
            message = queue.get(timeout=PATIENCE)
            seen.append(message.payload["p"])
            message.ack()
        queue.close()
    assert seen == expected


def test_fanout_crosses_both_ways(prefix: str) -> None:
    name = f"fx-{uuid.uuid4().hex[:6]}"
    k_exchange = kombu.Exchange(name, type="fanout", durable=False)
    with theirs(prefix) as conn:
        k_queue = kombu.Queue(f"kq-{uuid.uuid4().hex[:6]}", k_exchange, auto_delete=True)
        received: list[Any] = []
        transport = ours(prefix)
        try:
            exchange = Exchange(name, type="fanout", durable=False)
            transport.consume([Queue(f"tq-{uuid.uuid4().hex[:6]}", exchange=exchange,
                                     routing_key="")])
            with conn.Consumer([k_queue], callbacks=[lambda body, m: received.append(body)],
                               no_ack=True):
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=0.3)  # kombu subscribes on its first poll
                transport.publish(Envelope(body=b'{"from": "taskframe"}'), exchange=name,
                                  routing_key="")
                deadline = time.monotonic() + PATIENCE
                while not received and time.monotonic() < deadline:
                    with contextlib.suppress(TimeoutError):
                        conn.drain_events(timeout=0.5)
            assert received == [{"from": "taskframe"}]
            conn.Producer().publish({"from": "kombu"}, exchange=k_exchange, routing_key="")
            # Our own subscriber heard our publish too, then kombu's.
            got = receive(transport, 2)
            assert [m.decode() for m in got] == [{"from": "taskframe"}, {"from": "kombu"}]
        finally:
            transport.close()
