"""rpc:// round trips: a reply published (the worker's side) then read (the client's side),
taskframe's RPCBackend against Celery's on the same broker (RabbitMQ, Redis db 13).

Each round: ``store_result`` with the client's ``reply_to`` (as a worker does), then the
client waits for that task's result. Prints round trips per second and the ratio.

    .venv/bin/python t/benchmarks/bench_rpc.py [-n 10000] [--only amqp,redis]
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery
from celery.app.task import Context as CeleryContext

from taskframe import states
from taskframe.backends import BackendOptions, create_backend
from taskframe.protocol import ResultContext
from taskframe.transport import Connection

BROKERS = {"amqp": "amqp://guest:guest@127.0.0.1:5672//", "redis": "redis://127.0.0.1:6379/13"}


def _rounds(n: int, store: Callable[[str, int], Any], get: Callable[[str], Any]) -> float:
    ids = [str(uuid.uuid4()) for _ in range(n)]
    start = time.perf_counter()
    for i, task_id in enumerate(ids):
        store(task_id, i)
        assert get(task_id) == i
    return n / (time.perf_counter() - start)


def run_taskframe(url: str, n: int, reply_to: str) -> float:
    backend = create_backend("rpc://", BackendOptions(
        connection=lambda: Connection(url), reply_to=reply_to))
    backend.on_task_call("first", reply_to)  # declare and consume the reply queue

    def store(task_id: str, value: int) -> None:
        backend.store_result(task_id, value, states.SUCCESS,
                             context=ResultContext(reply_to=reply_to, correlation_id=task_id))

    try:
        return _rounds(n, store, lambda task_id: backend.wait_for(task_id)["result"])
    finally:
        backend.close()


def run_celery(url: str, n: int) -> float:
    app = Celery("bench-rpc", broker=url, backend="rpc://", set_as_current=False)
    backend = app.backend
    backend.result_consumer.start("first")  # declare and consume the reply queue

    def store(task_id: str, value: int) -> None:
        request = CeleryContext(id=task_id, reply_to=backend.oid, correlation_id=task_id)
        backend.store_result(task_id, value, "SUCCESS", request=request)

    try:
        return _rounds(n, store, lambda task_id: app.AsyncResult(task_id).get(timeout=30))
    finally:
        backend.result_consumer.stop()
        app.close()
        if url.startswith("redis"):
            client = redis.Redis.from_url(url)
            client.delete(backend.oid)
            client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10000)
    parser.add_argument("--only", default=",".join(BROKERS))
    args = parser.parse_args()
    print(f"{args.n} rpc reply + get round trips per broker")
    print(f"{'broker':10}{'taskframe/s':>14}{'celery/s':>12}{'ratio':>8}")
    for name in args.only.split(","):
        url = BROKERS[name]
        reply_to = f"bench-rpc-{uuid.uuid4().hex[:8]}"
        ours = run_taskframe(url, args.n, reply_to)
        if name == "redis":
            client = redis.Redis.from_url(url)
            for key in client.scan_iter(match=f"*{reply_to}*"):
                client.delete(key)
            client.close()
        theirs = run_celery(url, args.n)
        print(f"{name:10}{ours:14.0f}{theirs:12.0f}{ours / theirs:8.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
