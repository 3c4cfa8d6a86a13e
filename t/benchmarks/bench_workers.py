"""Worker benchmarks: the same workloads on taskframe and on Celery, same broker, same -c.

Run through ``run.py`` (``make bench``); see ``docs/benchmarks.md``. Workloads, each measured
per broker (RabbitMQ, Redis), one worker subprocess at a time:

* ``drain``: N no-op tasks are published, then the worker starts. Time runs from the
  worker's spawn to the moment the last task ran (a ``bench.mark`` task published after the
  N no-ops writes its wall-clock time into a file; acks are early, so it is also the last
  ack). A first ``bench.mark`` gives the steady rate (first task to last) as well. Beside it,
  the raw-client floor: a plain py-amqp / redis-py client consuming (and acking) N messages
  of the same size, no framework.
* ``sleep``: M tasks sleeping 100 ms at -c 100 (gevent, and asyncio for taskframe); each
  increments a Redis counter when done; time from the first task to the counter reaching M.
* ``latency``: sequential ``bench.echo.delay(i).get()`` round trips (Redis result backend)
  from this process; p50 and p99, after 10 warm-up calls.
* ``rss``: RSS (and PSS) summed over the worker and its pool children, 3 s after it ran its
  first task, with nothing else to do.
"""

from __future__ import annotations

import importlib
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import redis
from benchkit import (
    CELERY_POOLS,
    CONCURRENCY,
    FRAMEWORKS,
    PROJECT,
    Broker,
    WorkerProcess,
    amqp_connect,
    project_env,
    wait_for_file,
)

Cell = dict[str, Any]

#: The pools each workload runs on when the caller does not narrow them.
WORKLOAD_POOLS = {
    "drain": ("prefork", "threads", "gevent", "solo"),
    "sleep": ("gevent", "asyncio"),
    "latency": ("threads", "prefork"),
    "rss": ("prefork", "threads", "gevent", "solo"),
}
#: Pools that run the ``sleep`` workload at -c 100.
IO_POOLS = ("gevent", "eventlet", "asyncio")
IDLE_SECONDS = 3.0
#: Seconds a worker gets to run its first task (a worker hung at start-up fails its cell).
STARTUP_TIMEOUT = 90.0
WARMUP_CALLS = 10
RAW_PREFETCH = 100


@dataclass
class Options:
    """What to run (see ``run.py --help``)."""

    brokers: list[Broker]
    workloads: list[str]
    pools: list[str] | None
    n: int
    sleep_tasks: int
    latency_calls: int
    redis_url: str
    taskframe_pools: set[str]
    repeat: int = 1
    logdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="tfbench-")))


class Bench:
    """Runs the workloads and collects their cells (``results``, JSON-ready)."""

    def __init__(self, options: Options, progress: Callable[[str], None]) -> None:
        self.o = options
        self.progress = progress
        self.results: dict[str, Any] = {w: [] for w in options.workloads}
        self.results["raw"] = []
        self._clients: dict[tuple[str, str], ModuleType] = {}
        self._spawned = 0

    # -- the run ----------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Every selected workload on every selected broker."""
        try:
            for broker in self.o.brokers:
                self._run_broker(broker)
        finally:
            WorkerProcess.stop_all()
            for module in self._clients.values():
                module.app.close()
            for broker in self.o.brokers:
                broker.cleanup()
        return self.results

    def _run_broker(self, broker: Broker) -> None:
        if "drain" in self.o.workloads:
            self.results["raw"].append(self._cell(f"{broker.name} raw floor", self.raw_floor,
                                                  broker) | {"broker": broker.name})
            for pool in self._pools("drain"):
                self._row("drain", broker, pool, self.drain)
        if "rss" in self.o.workloads or "latency" in self.o.workloads:
            pools = [*self._pools("rss"), *self._pools("latency")]
            for pool in dict.fromkeys(pools):
                self._idle_row(broker, pool)
        if "sleep" in self.o.workloads:
            for pool in self._pools("sleep"):
                self._row("sleep", broker, pool, self.sleep)

    def _pools(self, workload: str) -> list[str]:
        """The workload's own pools, or those asked for (``sleep``: the -c 100 ones only)."""
        if workload not in self.o.workloads:
            return []
        if self.o.pools is None:
            return list(WORKLOAD_POOLS[workload])
        if workload == "sleep":
            return [p for p in self.o.pools if p in IO_POOLS]
        return list(self.o.pools)

    def _unavailable(self, framework: str, pool: str) -> str | None:
        if framework == "taskframe" and pool not in self.o.taskframe_pools:
            return "n/a (pool not available)"
        if framework == "celery" and pool not in CELERY_POOLS:
            return f"n/a (Celery has no {pool} pool)"
        return None

    def _row(self, workload: str, broker: Broker, pool: str,
             fn: Callable[[Broker, str, str], Cell]) -> None:
        row: dict[str, Any] = {"broker": broker.name, "pool": pool,
                               "concurrency": CONCURRENCY[pool]}
        runs: dict[str, list[Cell]] = {framework: [] for framework in FRAMEWORKS}
        # With --repeat the frameworks take turns (tf, Celery, tf, ...): the machine's
        # speed drifts over minutes, and a drift must not favour either side.
        for i in range(self.o.repeat):
            for framework in FRAMEWORKS:
                if self._unavailable(framework, pool):
                    continue
                label = f"{workload} {broker.name} {framework} -P {pool} -c {CONCURRENCY[pool]}"
                runs[framework].append(self._cell(self._nth(label, i), fn, broker, framework,
                                                  pool))
        for framework in FRAMEWORKS:
            na = self._unavailable(framework, pool)
            row[framework] = {"na": na} if na else _median_cell(runs[framework])
        self.results[workload].append(row)

    def _nth(self, label: str, i: int) -> str:
        return label if self.o.repeat == 1 else f"{label} run {i + 1}"

    def _idle_row(self, broker: Broker, pool: str) -> None:
        """One worker per framework and run answers both ``rss`` and ``latency`` for ``pool``."""
        rows = {w: {"broker": broker.name, "pool": pool, "concurrency": CONCURRENCY[pool]}
                for w in ("rss", "latency") if pool in self._pools(w)}
        runs: dict[str, dict[str, list[Cell]]] = {
            framework: {w: [] for w in rows} for framework in FRAMEWORKS}
        for i in range(self.o.repeat):
            for framework in FRAMEWORKS:
                if self._unavailable(framework, pool):
                    continue
                label = (f"idle/latency {broker.name} {framework} -P {pool} "
                         f"-c {CONCURRENCY[pool]}")
                cells = self._cell(self._nth(label, i), self.idle_and_latency, broker,
                                   framework, pool, list(rows))
                for workload in rows:
                    runs[framework][workload].append(cells.get(workload, cells))
        for framework in FRAMEWORKS:
            na = self._unavailable(framework, pool)
            for workload, row in rows.items():
                row[framework] = {"na": na} if na else _median_cell(runs[framework][workload])
        for workload, row in rows.items():
            self.results[workload].append(row)

    def _cell(self, label: str, fn: Callable[..., Cell], *args: Any) -> Cell:
        self.progress(f"  {label} ...")
        try:
            return fn(*args)
        except Exception as exc:  # one broken cell must not end the whole run
            traceback.print_exc(file=sys.stderr)
            return {"error": f"{type(exc).__name__}: {exc}"}

    # -- clients (this process publishes and waits for results) -------------------------

    def client(self, broker: Broker, framework: str) -> ModuleType:
        """The app module of ``framework`` configured for ``broker`` (imported once each)."""
        key = (broker.name, framework)
        if key not in self._clients:
            os.environ.update(project_env(broker, framework, self.o.redis_url))
            if str(PROJECT) not in sys.path:
                sys.path.insert(0, str(PROJECT))
            name = {"taskframe": "tfbench", "celery": "celerybench"}[framework]
            sys.modules.pop(name, None)
            self._clients[key] = importlib.import_module(name)
        return self._clients[key]

    def _worker(self, broker: Broker, framework: str, pool: str, what: str) -> WorkerProcess:
        env = project_env(broker, framework, self.o.redis_url)
        self._spawned += 1
        log = self.o.logdir / f"{self._spawned:03d}-{what}-{broker.name}-{framework}-{pool}.log"
        return WorkerProcess(framework, pool, CONCURRENCY[pool], env, log)

    def _marker(self, name: str) -> Path:
        path = Path(tempfile.mkdtemp(dir=self.o.logdir)) / name
        return path

    # -- workloads ----------------------------------------------------------------------

    def drain(self, broker: Broker, framework: str, pool: str) -> Cell:
        """Drain ``n`` no-op tasks published before the worker starts."""
        n = self.o.n
        mod = self.client(broker, framework)
        broker.purge(broker.queue(framework))
        first, last = self._marker("first"), self._marker("last")
        mod.mark.delay(str(first))
        started = time.perf_counter()
        for i in range(n):
            mod.noop.delay(i)
        publish_s = time.perf_counter() - started
        mod.mark.delay(str(last))
        worker = self._worker(broker, framework, pool, "drain")
        try:
            t_first = wait_for_file(first, worker, timeout=STARTUP_TIMEOUT)
            t_last = wait_for_file(last, worker, timeout=max(300.0, n / 20))
        finally:
            worker.stop()
        total = t_last - worker.started
        return {"tasks_per_s": (n + 2) / total, "seconds": total,
                "steady_per_s": n / max(t_last - t_first, 1e-9),
                "startup_s": t_first - worker.started, "publish_per_s": n / publish_s}

    def raw_floor(self, broker: Broker) -> Cell:
        """Consume + ack ``n`` task messages (published by taskframe) with a bare client."""
        n = self.o.n
        mod = self.client(broker, "taskframe")
        queue = broker.queue("raw")
        broker.purge(queue)
        for i in range(n):
            mod.noop.apply_async((i,), queue=queue)
        if broker.name == "redis":
            seconds, size = _raw_redis(broker.url, broker.prefix + queue, n)
        else:
            seconds, size = _raw_amqp(broker.url, queue, n)
        return {"tasks_per_s": n / seconds, "seconds": seconds, "message_bytes": size}

    def sleep(self, broker: Broker, framework: str, pool: str) -> Cell:
        """``sleep_tasks`` tasks of 100 ms at -c 100; done when a Redis counter says so."""
        count = self.o.sleep_tasks
        mod = self.client(broker, framework)
        broker.purge(broker.queue(framework))
        key = f"{broker.prefix}done.{framework}.{pool}.{time.monotonic_ns()}"
        task = mod.asleep if pool == "asyncio" else mod.sleep
        first = self._marker("first")
        mod.mark.delay(str(first))
        for _ in range(count):
            task.delay(key)
        counter = redis.Redis.from_url(self.o.redis_url)
        worker = self._worker(broker, framework, pool, "sleep")
        try:
            wait_for_file(first, worker, timeout=STARTUP_TIMEOUT)
            deadline = time.monotonic() + 120 + count * 0.2
            while int(counter.get(key) or 0) < count:
                worker.check_alive()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {int(counter.get(key) or 0)} of {count} done")
                time.sleep(0.005)
            t_done = time.time()
            t_first = float(first.read_text())
        finally:
            worker.stop()
            counter.delete(key)
            counter.close()
        seconds = t_done - t_first
        return {"tasks_per_s": count / seconds, "seconds": seconds,
                "ideal_seconds": count / CONCURRENCY[pool] * 0.1,
                "from_start_s": t_done - worker.started}

    def idle_and_latency(self, broker: Broker, framework: str, pool: str,
                         workloads: list[str]) -> dict[str, Cell]:
        """Idle RSS 3 s after the first task, then the round trips, on one fresh worker."""
        mod = self.client(broker, framework)
        broker.purge(broker.queue(framework))
        ready = self._marker("ready")
        mod.mark.delay(str(ready))
        worker = self._worker(broker, framework, pool, "idle")
        cells: dict[str, Cell] = {}
        try:
            wait_for_file(ready, worker, timeout=STARTUP_TIMEOUT)
            if "rss" in workloads:
                time.sleep(IDLE_SECONDS)
                worker.check_alive()
                cells["rss"] = worker.rss()
            if "latency" in workloads:
                cells["latency"] = self._latency(mod)
        finally:
            worker.stop()
        return cells

    def _latency(self, mod: ModuleType) -> Cell:
        for i in range(WARMUP_CALLS):
            mod.echo.delay(i).get(timeout=60)
        samples: list[float] = []
        for i in range(self.o.latency_calls):
            started = time.perf_counter()
            value = mod.echo.delay(i).get(timeout=60)
            samples.append(time.perf_counter() - started)
            if value != i:
                raise RuntimeError(f"echo({i}) returned {value!r}")
        samples.sort()
        return {"p50_ms": statistics.median(samples) * 1000,
                "p99_ms": samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1000,
                "mean_ms": statistics.fmean(samples) * 1000, "calls": len(samples)}


def _median_cell(runs: list[Cell]) -> Cell:
    """``--repeat`` runs of one cell: the median of each figure, every run kept."""
    good = [r for r in runs if "error" not in r]
    if len(runs) == 1 or not good:
        return runs[0]
    merged: Cell = {key: statistics.median(r[key] for r in good) for key in good[0]}
    merged["runs"] = runs
    return merged


def _raw_redis(url: str, key: str, n: int) -> tuple[float, int]:
    """BRPOP ``n`` messages one by one: on a plain list the pop is the ack."""
    started = time.perf_counter()
    client = redis.Redis.from_url(url)
    size = 0
    for _ in range(n):
        item = client.brpop([key], timeout=10)
        if item is None:
            raise RuntimeError(f"{key} ran dry before {n} messages")
        size = len(item[1])
    seconds = time.perf_counter() - started
    client.close()
    return seconds, size


def _raw_amqp(url: str, queue: str, n: int) -> tuple[float, int]:
    """basic_consume with prefetch 100 and one basic_ack per message."""
    started = time.perf_counter()
    conn = amqp_connect(url)
    channel = conn.channel()
    channel.basic_qos(0, RAW_PREFETCH, False)
    received = 0
    size = 0

    def on_message(message: Any) -> None:
        nonlocal received, size
        received += 1
        size = len(message.body)
        channel.basic_ack(message.delivery_info["delivery_tag"])

    channel.basic_consume(queue, callback=on_message)
    while received < n:
        conn.drain_events(timeout=10)
    seconds = time.perf_counter() - started
    conn.close()
    return seconds, size
