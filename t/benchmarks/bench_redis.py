"""Publish then consume (and ack) N messages on Redis: raw redis-py, taskframe, kombu.

One run each, in this process, on the same server and the same body bytes:

* ``raw``: the floor: N x ``LPUSH`` then N x ``BRPOP`` of the envelope bytes, no acks.
* ``taskframe``: ``RedisTransport.publish`` N times, then ``poll`` + ``Message.ack`` (each
  take is recorded in ``unacked`` by the claim script, each ack is HDEL + ZREM).
* ``kombu``: kombu 5.7's Redis transport, ``Producer.publish`` then ``drain_events`` +
  ``message.ack()`` (BRPOP + unacked pipeline per message).

Usage: ``.venv/bin/python t/benchmarks/bench_redis.py -n 20000 [--url redis://...]``.
Keys live under a unique ``global_keyprefix`` and are deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from collections.abc import Callable

import redis

from taskframe.transport import Envelope, Queue
from taskframe.transport.redis import RedisTransport

BODY = json.dumps([[2, 3], {}, {"callbacks": None, "errbacks": None, "chain": None,
                                "chord": None}]).encode()
HEADERS = {"lang": "py", "task": "bench.add", "id": "", "retries": 0}


def bench_raw(url: str, prefix: str, n: int) -> float:
    client = redis.Redis.from_url(url)
    key = f"{prefix}raw"
    payload = json.dumps({"body": BODY.decode(), "headers": HEADERS, "properties": {}})
    started = time.perf_counter()
    for _ in range(n):
        client.lpush(key, payload)
    for _ in range(n):
        assert client.brpop([key], timeout=5) is not None
    elapsed = time.perf_counter() - started
    client.close()
    return elapsed


def bench_taskframe(url: str, prefix: str, n: int) -> float:
    transport = RedisTransport(url, {"global_keyprefix": prefix})
    transport.connect()
    queue = Queue("tf")
    transport.declare(queue)
    envelope = Envelope(body=BODY, headers=HEADERS, properties={"priority": 0})
    started = time.perf_counter()
    for _ in range(n):
        transport.publish(envelope, exchange="", routing_key="tf")
    transport.consume([queue], prefetch_count=0)
    done = 0
    while done < n:
        for message in transport.poll(1.0):
            message.ack()
            done += 1
    elapsed = time.perf_counter() - started
    transport.close()
    return elapsed


def bench_kombu(url: str, prefix: str, n: int) -> float:
    import kombu

    queue = kombu.Queue("kb", kombu.Exchange("kb"), routing_key="kb")
    done = 0
    with kombu.Connection(url, transport_options={"global_keyprefix": prefix}) as conn:
        producer = conn.Producer()
        started = time.perf_counter()
        for _ in range(n):
            producer.publish(BODY, routing_key="kb", exchange="", declare=[queue],
                             content_type="application/json", content_encoding="utf-8",
                             headers=HEADERS)

        def on_message(body: object, message: kombu.Message) -> None:
            nonlocal done
            message.ack()
            done += 1

        with conn.Consumer([queue], callbacks=[on_message], prefetch_count=0):
            while done < n:
                conn.drain_events(timeout=5)
        elapsed = time.perf_counter() - started
    return elapsed


def latency_taskframe(url: str, prefix: str, count: int) -> list[float]:
    """Publish-to-receipt seconds seen by an idle consumer polling in its own thread."""
    received: dict[int, float] = {}
    stop = threading.Event()

    def consume() -> None:
        consumer = RedisTransport(url, {"global_keyprefix": prefix})
        consumer.connect()
        consumer.consume([Queue("lat")])
        while not stop.is_set():
            for message in consumer.poll(0.5):
                received[int(message.headers["n"])] = time.perf_counter()
                message.ack()
        consumer.close()

    thread = threading.Thread(target=consume)
    thread.start()
    producer = RedisTransport(url, {"global_keyprefix": prefix})
    producer.connect()
    sent: dict[int, float] = {}
    for n in range(count):
        time.sleep(0.3)  # the consumer goes idle and its polling backs off
        sent[n] = time.perf_counter()
        producer.publish(Envelope(body=BODY, headers={"n": n}), exchange="", routing_key="lat")
    deadline = time.monotonic() + 10
    while len(received) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    thread.join()
    producer.close()
    return [received[n] - sent[n] for n in sorted(received)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20_000)
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--latency", type=int, default=0,
                        help="also measure the idle publish-to-receipt latency of this many "
                             "messages (taskframe; kombu's BRPOP answers at once)")
    args = parser.parse_args()
    prefix = f"bench{uuid.uuid4().hex[:8]}."
    runs: list[tuple[str, Callable[[str, str, int], float]]] = [
        ("raw redis-py (LPUSH/BRPOP)", bench_raw),
        ("taskframe RedisTransport", bench_taskframe),
        ("kombu 5.7 redis", bench_kombu),
    ]
    results: list[tuple[str, float]] = []
    latencies: list[float] = []
    try:
        for name, fn in runs:
            results.append((name, fn(args.url, prefix, args.n)))
        if args.latency:
            latencies = sorted(latency_taskframe(args.url, prefix, args.latency))
    finally:
        client = redis.Redis.from_url(args.url)
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()
    floor = results[0][1]
    print(f"publish + consume + ack of {args.n} messages, {args.url}")
    print(f"{'':30} {'seconds':>9} {'msg/s':>9} {'x raw':>7}")
    for name, seconds in results:
        print(f"{name:30} {seconds:9.2f} {args.n / seconds:9.0f} {seconds / floor:7.2f}")
    ours = dict(results)["taskframe RedisTransport"]
    theirs = dict(results)["kombu 5.7 redis"]
    print(f"taskframe / kombu time ratio: {ours / theirs:.2f}")
    if latencies:
        print(f"taskframe idle latency over {len(latencies)} messages: "
              f"median {latencies[len(latencies) // 2] * 1000:.1f} ms, "
              f"max {latencies[-1] * 1000:.1f} ms")


if __name__ == "__main__":
    main()
