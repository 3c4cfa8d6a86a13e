"""Publish and consume N messages on RabbitMQ: raw py-amqp, our transport, kombu's pyamqp.

Same server, same run, same work for each client: N persistent ~100-byte JSON
messages published one by one with publisher confirms (each publish waits for
its confirm), then consumed with manual acks, one ack per message, prefetch 100.
Each client gets its own fresh classic queue, deleted afterwards.

Usage::

    .venv/bin/python t/benchmarks/bench_amqp.py --n 20000 [--url amqp://guest:guest@127.0.0.1//]
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from collections.abc import Callable

import amqp
import kombu

from taskframe.transport import Envelope, Queue
from taskframe.transport.amqp import AMQPTransport

PREFETCH = 100
BODY = json.dumps({"task": "bench.add", "args": [1, 2], "id": "x" * 36, "pad": "y" * 20}).encode()


def bench_raw(url: str, n: int, queue: str) -> tuple[float, float]:
    """The floor: py-amqp calls with nothing around them."""
    conn = amqp.Connection(host=url.split("@")[-1].strip("/"), userid="guest", password="guest")
    conn.connect()
    ch = conn.channel()
    ch.queue_declare(queue, durable=True, auto_delete=False)
    start = time.perf_counter()
    for _ in range(n):
        msg = amqp.Message(BODY, content_type="application/json", content_encoding="utf-8",
                           delivery_mode=2, application_headers={"id": "x"})
        ch.basic_publish_confirm(msg, exchange="", routing_key=queue, mandatory=True)
    published = time.perf_counter() - start
    received = 0
    sub = conn.channel()
    sub.basic_qos(0, PREFETCH, False)

    def on_message(message: amqp.Message) -> None:
        nonlocal received
        received += 1
        sub.basic_ack(message.delivery_info["delivery_tag"])

    start = time.perf_counter()
    tag = sub.basic_consume(queue, callback=on_message)
    while received < n:
        conn.drain_events(timeout=10)
    consumed = time.perf_counter() - start
    sub.basic_cancel(tag)
    ch.queue_delete(queue)
    conn.close()
    return published, consumed


def bench_ours(url: str, n: int, queue: str) -> tuple[float, float]:
    """taskframe's AMQPTransport: publish() with confirms, poll() and ack()."""
    transport = AMQPTransport(url, {})
    transport.connect()
    q = Queue(queue)
    transport.declare(q)
    start = time.perf_counter()
    for _ in range(n):
        envelope = Envelope(BODY, headers={"id": "x"}, properties={"delivery_mode": 2})
        transport.publish(envelope, exchange="", routing_key=queue)
    published = time.perf_counter() - start
    transport.consume([q], prefetch_count=PREFETCH)
    received = 0
    start = time.perf_counter()
    while received < n:
        for message in transport.poll(10):
            message.ack()
            received += 1
    consumed = time.perf_counter() - start
    transport.delete_queue(queue)
    transport.delete_exchange(queue)
    transport.close()
    return published, consumed


def bench_kombu(url: str, n: int, queue: str) -> tuple[float, float]:
    """kombu 5.7's pyamqp transport with confirm_publish, as Celery configures it."""
    with kombu.Connection(url.replace("amqp://", "pyamqp://", 1),
                          transport_options={"confirm_publish": True}) as conn:
        q = kombu.Queue(queue, kombu.Exchange(queue, "direct"), routing_key=queue)
        producer = conn.Producer()
        q.bind(conn.default_channel).declare()
        start = time.perf_counter()
        for _ in range(n):
            producer.publish(BODY, exchange="", routing_key=queue, content_type="application/json",
                             content_encoding="utf-8", headers={"id": "x"}, delivery_mode=2,
                             mandatory=True)
        published = time.perf_counter() - start
        received = 0

        def on_message(_body: object, message: kombu.Message) -> None:
            nonlocal received
            received += 1
            message.ack()

        start = time.perf_counter()
        with conn.Consumer([q], callbacks=[on_message], prefetch_count=PREFETCH):
            while received < n:
                conn.drain_events(timeout=10)
        consumed = time.perf_counter() - start
        q.bind(conn.default_channel).delete()
        kombu.Exchange(queue).bind(conn.default_channel).delete()
    return published, consumed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672//")
    args = parser.parse_args()
    clients: list[tuple[str, Callable[[str, int, str], tuple[float, float]]]] = [
        ("raw py-amqp", bench_raw), ("taskframe amqp", bench_ours), ("kombu pyamqp", bench_kombu),
    ]
    rows = []
    for name, fn in clients:
        queue = f"tfbench-{uuid.uuid4().hex[:10]}"
        published, consumed = fn(args.url, args.n, queue)
        rows.append((name, args.n / published, args.n / consumed))
    floor_pub, floor_con = rows[0][1], rows[0][2]
    print(f"N = {args.n} messages, RabbitMQ at {args.url.split('@')[-1]}")
    print(f"{'client':<16} {'publish msg/s':>14} {'consume msg/s':>14} "
          f"{'pub vs raw':>10} {'con vs raw':>10}")
    for name, pub, con in rows:
        print(f"{name:<16} {pub:>14,.0f} {con:>14,.0f} {pub / floor_pub:>10.2f} "
              f"{con / floor_con:>10.2f}")
    ours, kombu_row = rows[1], rows[2]
    print(f"taskframe / kombu: publish {ours[1] / kombu_row[1]:.2f}x, "
          f"consume {ours[2] / kombu_row[2]:.2f}x")


if __name__ == "__main__":
    main()
