"""What the benchmark tasks do, shared by the taskframe app and the Celery app.

The two app modules (``tfbench``, ``celerybench``) register the same functions under the same
names, so both workers run identical code. Settings come from ``BENCH_*`` environment variables
set by ``t/benchmarks/bench_workers.py``:

* ``BENCH_BROKER``: broker URL; ``BENCH_BACKEND``: result backend URL (Redis).
* ``BENCH_QUEUE``: the dedicated queue (also the default queue).
* ``BENCH_PREFIX``: Redis ``global_keyprefix`` of broker and backend keys.
* ``BENCH_REDIS``: where the ``count`` tasks increment their counter.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis

_client: redis.Redis | None = None


def settings() -> dict[str, Any]:
    """The Celery-named settings both apps use, from the environment."""
    prefix = os.environ.get("BENCH_PREFIX", "tfbench.")
    broker = os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/0")
    conf: dict[str, Any] = {
        "broker_url": broker,
        "result_backend": os.environ.get("BENCH_BACKEND", "redis://127.0.0.1:6379/0"),
        "result_backend_transport_options": {"global_keyprefix": prefix},
        "task_default_queue": os.environ.get("BENCH_QUEUE", "taskframe-bench"),
        "worker_prefetch_multiplier": 4,
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": True,
    }
    if broker.startswith("redis"):
        conf["broker_transport_options"] = {"global_keyprefix": prefix}
    return conf


def noop(i: int) -> None:
    """The drain workload: nothing at all."""


def echo(i: int) -> int:
    """The round-trip workload: the argument back, through the result backend."""
    return i


def mark(path: str) -> None:
    """Write the wall-clock time into ``path`` (first/last task of a run, readiness)."""
    with open(path + ".tmp", "w") as f:
        f.write(repr(time.time()))
    os.replace(path + ".tmp", path)


def count(key: str) -> None:
    """Increment the Redis counter ``key`` (one per finished task)."""
    global _client
    if _client is None:
        _client = redis.Redis.from_url(os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/0"))
    _client.incr(key)


def sleep(key: str) -> None:
    """The I/O workload: sleep 100 ms (cooperatively under gevent), then count."""
    time.sleep(0.1)
    count(key)


async def asleep(key: str) -> None:
    """The I/O workload as a coroutine (asyncio pool): ``await asyncio.sleep(0.1)``, count."""
    import asyncio

    await asyncio.sleep(0.1)
    count(key)
