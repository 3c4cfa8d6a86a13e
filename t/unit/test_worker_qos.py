"""Rate limits and QoS (prefetch bounds) of the consumer, on the in-process memory broker."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from workers import InlineWorkers

from taskframe import Taskframe
from taskframe.errors import ImproperlyConfigured
from taskframe.transport.memory import MemoryTransport
from taskframe.worker.ratelimit import RateLimits, TokenBucket, parse_rate


@pytest.mark.parametrize(("text", "per_second"), [
    ("10/s", 10.0), ("120/m", 2.0), ("3600/h", 1.0), ("2.5", 2.5), (4, 4.0), (None, 0.0),
    ("0", 0.0), (" 30 / min", 0.5),
])
def test_parse_rate(text: Any, per_second: float) -> None:
    assert parse_rate(text) == pytest.approx(per_second)


@pytest.mark.parametrize("text", ["ten/s", "10/d", "/s"])
def test_parse_rate_rejects_other_forms(text: str) -> None:
    with pytest.raises(ImproperlyConfigured, match="rate limit"):
        parse_rate(text)


def test_token_bucket_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=2.0)  # one token every 0.5 s, burst of one
    now = time.monotonic() + 10  # a full bucket
    assert bucket.take(now) == 0.0
    assert bucket.take(now) == pytest.approx(0.5)
    assert bucket.take(now + 0.25) == pytest.approx(0.25)
    assert bucket.take(now + 0.5) == 0.0


def test_rate_limits_set_at_run_time_win_and_zero_removes() -> None:
    limits = RateLimits()
    assert limits.delay("t", None) == 0.0
    limits.set("t", "1/h")
    assert limits.delay("t", None) == 0.0
    assert limits.delay("t", None) > 3000
    limits.set("t", 0)
    assert limits.delay("t", "1/h") == 0.0


@pytest.fixture
def app() -> Iterator[Taskframe]:
    app = Taskframe("qos", broker=f"memory://{uuid.uuid4().hex}", backend="memory://",
                    set_as_current=False)
    yield app
    app.close()


@pytest.fixture
def run_worker(app: Taskframe) -> Iterator[Any]:
    workers = InlineWorkers(app, concurrency=4)
    yield workers.start
    workers.stop_all()


def test_rate_limited_task_starts_spaced_and_others_are_not_held(app: Taskframe,
                                                                  run_worker: Any) -> None:
    starts: list[float] = []

    @app.task(rate_limit="10/s")
    def limited() -> None:
        starts.append(time.monotonic())

    @app.task
    def free(x: int) -> int:
        return x

    run_worker()
    results = [limited.delay() for _ in range(5)]
    others = [free.delay(i) for i in range(5)]
    assert [r.get(timeout=10) for r in others] == list(range(5))
    for r in results:
        r.get(timeout=10)
    starts.sort()
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # One token per 0.1 s: no two runs start closer than the refill allows (lower bound only:
    # a slow machine makes the gaps longer, never shorter).
    assert all(gap >= 0.08 for gap in gaps), gaps


def test_rate_limit_changed_at_run_time(app: Taskframe, run_worker: Any) -> None:
    @app.task(rate_limit="1/h")
    def hourly(x: int) -> int:
        return x

    worker = run_worker()
    first = hourly.delay(1)
    assert first.get(timeout=10) == 1
    second = hourly.delay(2)
    deadline = time.monotonic() + 5
    while worker.consumer is None or not worker.consumer.limited:
        assert time.monotonic() < deadline, "second run was not held by the rate limit"
        time.sleep(0.02)
    assert not second.ready()
    worker.consumer.set_rate_limit(hourly.name, None)  # what control rate_limit does
    assert second.get(timeout=10) == 2


def test_disable_rate_limits_setting(app: Taskframe, run_worker: Any) -> None:
    app.conf.worker_disable_rate_limits = True

    @app.task(rate_limit="1/h")
    def hourly(x: int) -> int:
        return x

    run_worker()
    assert [hourly.delay(i).get(timeout=10) for i in range(3)] == [0, 1, 2]


def test_disable_prefetch_takes_only_for_free_slots(app: Taskframe, run_worker: Any) -> None:
    app.conf.worker_disable_prefetch = True
    gate = threading.Event()
    seen: list[int] = []

    @app.task
    def block() -> None:
        gate.wait(10)

    worker = run_worker(concurrency=2)
    results = [block.delay() for _ in range(6)]
    deadline = time.monotonic() + 5
    while worker.consumer is None or worker.consumer.running < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    for _ in range(10):  # the loop turns while both slots are busy
        consumer = worker.consumer
        seen.append(consumer.held + len(consumer.reserved))
        time.sleep(0.03)
    transport = worker.consumer.connection.transport
    assert seen == [0] * 10  # early acks: running tasks are settled, nothing else is held
    assert transport.queue_size(app.conf.task_default_queue) == 4  # still on the broker
    gate.set()
    for r in results:
        r.get(timeout=10)


@pytest.mark.parametrize(("eta_task_limit", "first"), [(None, 99), (0, 0)])
def test_eta_messages_raise_the_prefetch_bound(app: Taskframe, run_worker: Any,
                                               eta_task_limit: int | None, first: int,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # As on a broker that cannot delay: ETA messages are delivered at once and wait in
    # the worker's memory.
    monkeypatch.setattr(MemoryTransport, "can_delay", lambda self, exchange, key: False)
    app.conf.worker_prefetch_multiplier = 1
    app.conf.worker_eta_task_limit = eta_task_limit

    order: list[int] = []

    @app.task
    def echo(x: int) -> int:
        order.append(x)
        return x

    run_worker(concurrency=1)
    later = [echo.apply_async((i,), countdown=1.5) for i in range(3)]
    now = echo.delay(99)
    # Three ETA messages wait in memory; with a bound of 1 the fourth would be stuck
    # behind them until they ran. The bound grows with them instead, up to
    # worker_eta_task_limit (0: it does not grow, and 99 waits for the ETAs).
    assert now.get(timeout=10) == 99
    assert [r.get(timeout=10) for r in later] == [0, 1, 2]
    assert order[0] == first


@pytest.mark.parametrize("pool_name", ["threads", "solo"])
def test_jobs_queued_ahead_in_a_thread_pool_start_in_order_or_come_back(
        app: Taskframe, pool_name: str) -> None:
    # A thread pool holds up to ``concurrency`` jobs beyond its threads; a thread takes
    # the next one as it ends a job. Those no thread took come back with take_back()
    # untouched: neither accepted (no early ack) nor done.
    from taskframe.context import Context
    from taskframe.pools import POOLS
    from taskframe.pools.base import TaskJob

    release = threading.Event()
    started: list[int] = []

    @app.task
    def step(n: int) -> int:
        started.append(n)
        release.wait(10)
        return n

    pool = POOLS[pool_name](1, app=app)
    assert pool.queue_ahead == 1
    accepted: list[int] = []
    done: list[int] = []

    def job(n: int) -> TaskJob:
        return TaskJob(task=step, context=Context(id=f"j{n}", task=step.name, args=[n]),
                       store=False, on_accepted=lambda j: accepted.append(j.context.args[0]),
                       on_done=lambda j, o: done.append(o.retval))

    pool.start()
    try:
        jobs = [job(n) for n in range(3)]
        for j in jobs:
            pool.submit(j)
        wait_for = time.monotonic() + 10
        while not started and time.monotonic() < wait_for:
            time.sleep(0.01)
        assert started == [0]
        assert pool.take_back() == jobs[1:]
        assert pool.take_back() == []
        release.set()
        while len(done) < 1 and time.monotonic() < wait_for:
            time.sleep(0.01)
        pool.submit(jobs[1])  # given back, then submitted again: runs once
        while len(done) < 2 and time.monotonic() < wait_for:
            time.sleep(0.01)
    finally:
        pool.stop(timeout=5)
    assert started == [0, 1] and accepted == [0, 1] and done == [0, 1]
