"""What only the memory transport promises: named brokers, threads, garbage collection.

The behaviour every transport shares is in t/integration/test_transport_contract.py.
"""

from __future__ import annotations

import gc
import threading
import uuid

import pytest

from taskframe.transport import Envelope, Exchange, Message, Queue
from taskframe.transport.errors import BrokerConnectionError, ImproperlyConfigured
from taskframe.transport.memory import MemoryTransport


def connected(url: str, *queues: Queue, prefetch: int = 0) -> MemoryTransport:
    transport = MemoryTransport(url)
    transport.connect()
    if queues:
        transport.consume(list(queues), prefetch_count=prefetch)
    return transport


@pytest.fixture
def url() -> str:
    return f"memory://unit-{uuid.uuid4().hex}"


def test_same_name_shares_a_broker_other_names_are_isolated(url: str) -> None:
    publisher = connected(url)
    publisher.publish(Envelope(b"1"), exchange="", routing_key="q")
    assert connected(url).queue_size("q") == 1
    assert connected(f"{url}-other").queue_size("q") == 0
    publisher.close()
    publisher.close()  # idempotent
    assert not publisher.connected


def test_not_connected_raises(url: str) -> None:
    transport = MemoryTransport(url)
    with pytest.raises(BrokerConnectionError):
        transport.publish(Envelope(b"1"), exchange="", routing_key="q")
    with pytest.raises(BrokerConnectionError):
        transport.poll(timeout=0)


def test_headers_exchange_is_refused(url: str) -> None:
    with pytest.raises(ImproperlyConfigured):
        connected(url).declare(Queue("q", Exchange("h", "headers")))


def test_publisher_cannot_alter_a_published_message(url: str) -> None:
    transport = connected(url, Queue("q"))
    envelope = Envelope(b"1", headers={"a": 1})
    transport.publish(envelope, exchange="", routing_key="q")
    envelope.headers["a"] = 2
    [message] = transport.poll(timeout=1)
    assert message.headers == {"a": 1}


def test_dropped_holder_gives_messages_back(url: str) -> None:
    holder = connected(url, Queue("q"))
    holder.publish(Envelope(b"1"), exchange="", routing_key="q")
    assert len(holder.poll(timeout=1)) == 1
    del holder
    gc.collect()
    other = connected(url, Queue("q"))
    [message] = other.poll(timeout=1)
    assert message.delivery_info["redelivered"] is True


def test_blocked_poll_wakes_on_publish_from_another_thread(url: str) -> None:
    consumer = connected(url, Queue("q"))
    publisher = connected(url)
    timer = threading.Timer(
        0.1, lambda: publisher.publish(Envelope(b"late"), exchange="", routing_key="q")
    )
    timer.start()
    try:
        received = consumer.poll(timeout=None)  # blocks until the publish
    finally:
        timer.join()
    assert [m.body for m in received] == [b"late"]


def test_threads_consume_each_message_once(url: str) -> None:
    count, workers = 2000, 4
    publisher = connected(url)
    for n in range(count):
        publisher.publish(Envelope(str(n).encode()), exchange="", routing_key="q")
    seen: list[list[int]] = [[] for _ in range(workers)]

    def work(index: int) -> None:
        transport = connected(url, Queue("q"), prefetch=7)
        while True:
            messages: list[Message] = transport.poll(timeout=0.2)
            if not messages:
                break
            for message in messages:
                seen[index].append(int(message.body))
                message.ack()
        transport.close()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    everything = sorted(n for part in seen for n in part)
    assert everything == list(range(count))
    assert publisher.queue_size("q") == 0
