"""The asyncio pool: its interface driven directly (in-process), and a worker subprocess."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent / "poolproj"))
from poolfleet import PoolFleet, max_overlap
from workers import wait_until

from taskframe import SoftTimeLimitExceeded, Task, Taskframe, states
from taskframe.context import Context
from taskframe.errors import TimeLimitExceeded
from taskframe.execution.outcome import Outcome
from taskframe.pools._daemon_threads import DaemonThreadPoolExecutor
from taskframe.pools.asyncio import AsyncioPool
from taskframe.pools.base import TaskJob

HAS_UVLOOP = importlib.util.find_spec("uvloop") is not None


class Harness:
    """An app with a memory backend, an ``AsyncioPool`` and the outcomes it reported."""

    def __init__(self, concurrency: int = 4) -> None:
        self.app = Taskframe("aio", broker="memory://", backend="memory://",
                             set_as_current=False)
        self.pool = AsyncioPool(concurrency, app=self.app)
        self.outcomes: dict[str, Outcome] = {}
        self.accepted: list[str] = []
        self.events: list[str] = []
        self._done = threading.Condition()

    def job(self, task: Task[Any, Any], *args: Any, time_limit: float | None = None,
            soft_time_limit: float | None = None) -> TaskJob:
        ctx = Context(id=str(uuid.uuid4()), task=task.name, args=list(args),
                      called_directly=False)
        return TaskJob(task=task, context=ctx, store=True, on_accepted=self._on_accepted,
                       on_done=self._on_done, time_limit=time_limit,
                       soft_time_limit=soft_time_limit)

    def _on_accepted(self, job: TaskJob) -> None:
        self.accepted.append(job.id)

    def _on_done(self, job: TaskJob, outcome: Outcome) -> None:
        with self._done:
            assert job.id not in self.outcomes, "on_done called twice"
            self.outcomes[job.id] = outcome
            self._done.notify_all()

    def run(self, *jobs: TaskJob, timeout: float = 10) -> list[Outcome]:
        for job in jobs:
            self.pool.submit(job)
        return self.wait(*jobs, timeout=timeout)

    def wait(self, *jobs: TaskJob, timeout: float = 10) -> list[Outcome]:
        with self._done:
            assert self._done.wait_for(lambda: all(j.id in self.outcomes for j in jobs),
                                       timeout), "jobs did not finish"
        return [self.outcomes[j.id] for j in jobs]

    def stored(self, job: TaskJob) -> str:
        return str(self.app.backend.get_task_meta(job.id)["status"])


@pytest.fixture
def aio() -> Iterator[Harness]:
    harness = Harness()
    harness.pool.start()
    yield harness
    harness.pool.stop(wait=False)
    harness.app.close()


def test_async_and_sync_tasks_run_with_their_request(aio: Harness) -> None:
    @aio.app.task(bind=True)
    async def whoami(self: Task[Any, Any]) -> tuple[str | None, str]:
        await asyncio.sleep(0.01)
        return self.request.id, type(asyncio.get_running_loop()).__module__

    @aio.app.task(bind=True)
    def sync_whoami(self: Task[Any, Any]) -> tuple[str | None, str, bool]:
        thread = threading.current_thread()
        return self.request.id, thread.name, thread.daemon

    a, s = aio.job(whoami), aio.job(sync_whoami)
    (out_a, out_s) = aio.run(a, s)
    assert out_a.state == states.SUCCESS and out_a.retval[0] == a.id
    assert out_a.retval[1].startswith("uvloop" if HAS_UVLOOP else "asyncio")
    assert out_s.retval[0] == s.id
    assert out_s.retval[1].startswith("taskframe-aio-sync")  # the loop's default executor
    assert out_s.retval[2] is True  # a cold shutdown does not wait for a sync task
    assert sorted(aio.accepted) == sorted([a.id, s.id])
    assert aio.stored(a) == aio.stored(s) == states.SUCCESS
    assert aio.pool.active == 0


def test_no_uvloop_when_the_setting_says_so() -> None:
    harness = Harness()
    harness.app.conf.worker_asyncio_uvloop = False

    @harness.app.task
    async def kind() -> str:
        return type(asyncio.get_running_loop()).__module__

    harness.pool.start()
    try:
        assert harness.run(harness.job(kind))[0].retval.startswith("asyncio")
    finally:
        harness.pool.stop(wait=False)


def test_concurrency_coroutines_at_once() -> None:
    harness = Harness(concurrency=20)
    lines: list[str] = []

    @harness.app.task
    async def nap(n: int) -> int:
        lines.append(f"start {n} {time.monotonic()}")
        await asyncio.sleep(0.2)
        lines.append(f"end {n} {time.monotonic()}")
        return n

    harness.pool.start()
    try:
        outcomes = harness.run(*(harness.job(nap, n) for n in range(20)))
    finally:
        harness.pool.stop(wait=False)
    assert [o.retval for o in outcomes] == list(range(20))
    assert max_overlap(lines) >= 10


def test_soft_limit_is_raised_inside_the_coroutine(aio: Harness) -> None:
    @aio.app.task
    async def careful() -> str:
        try:
            await asyncio.sleep(10)
        except SoftTimeLimitExceeded:
            await asyncio.sleep(0.01)  # the task may still await while it cleans up
            return "cleaned up"
        return "slept"

    @aio.app.task
    async def careless() -> str:
        await asyncio.sleep(10)
        return "slept"

    caught, raised = aio.run(aio.job(careful, soft_time_limit=0.2),
                             aio.job(careless, soft_time_limit=0.2))
    assert caught.state == states.SUCCESS and caught.retval == "cleaned up"
    assert raised.state == states.FAILURE and isinstance(raised.retval, SoftTimeLimitExceeded)


def test_hard_limit_cancels_and_fails_with_time_limit_exceeded(aio: Harness) -> None:
    seen: list[str] = []

    @aio.app.task
    async def slow() -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        return "slept"

    @aio.app.task
    async def stubborn() -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return "ignored the cancellation"
        return "slept"

    job, job2 = aio.job(slow, time_limit=0.2), aio.job(stubborn, time_limit=0.2)
    out, out2 = aio.run(job, job2)
    assert seen == ["cancelled"]
    for outcome, j in ((out, job), (out2, job2)):
        assert outcome.state == states.FAILURE
        assert isinstance(outcome.retval, TimeLimitExceeded)
        assert aio.stored(j) == states.FAILURE


def test_abort_at_shutdown_cancels_and_gives_the_message_back(aio: Harness) -> None:
    seen: list[Any] = []
    started = threading.Event()

    @aio.app.task(bind=True)
    async def long(self: Task[Any, Any]) -> str:
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            seen.append((self.request.should_abort(), self.request.abort_reason))
            raise
        return "slept"

    job = aio.job(long)
    aio.pool.submit(job)
    assert started.wait(5)
    aio.pool.abort(job, "shutdown")
    (outcome,) = aio.wait(job)
    assert seen == [(True, "shutdown")]
    assert outcome.state == states.REJECTED and outcome.requeue
    assert aio.stored(job) == states.PENDING  # nothing stored: it runs again elsewhere


def test_terminate(aio: Harness) -> None:
    started = threading.Event()

    @aio.app.task
    async def long() -> str:
        started.set()
        await asyncio.sleep(10)
        return "slept"

    sync_started = threading.Event()

    @aio.app.task(bind=True)
    def sync_long(self: Task[Any, Any]) -> str | None:
        sync_started.set()
        while not self.request.should_abort():
            time.sleep(0.01)
        return self.request.abort_reason

    job, sync_job = aio.job(long), aio.job(sync_long)
    aio.pool.submit(job)
    aio.pool.submit(sync_job)
    # Both bodies run before they are stopped: asked before its body starts, a run is
    # skipped as revoked (``execution.revoked``), which is not what this test is about.
    assert started.wait(5) and sync_started.wait(5)
    assert aio.pool.terminate(job) is True
    assert aio.pool.terminate(sync_job) is False  # a thread cannot be stopped: it is asked
    out, sync_out = aio.wait(job, sync_job)
    assert out.state == states.REVOKED and aio.stored(job) == states.REVOKED
    assert sync_out.retval == "revoked"


def test_stop_cancels_what_is_left(aio: Harness) -> None:
    @aio.app.task
    async def long() -> str:
        await asyncio.sleep(10)
        return "slept"

    job = aio.job(long)
    aio.pool.submit(job)
    wait_until(lambda: aio.accepted, 5, "the job to start")
    aio.pool.stop(wait=True, timeout=0.2)
    (outcome,) = aio.wait(job)
    assert outcome.state == states.REJECTED and outcome.requeue
    assert aio.pool.active == 0


def test_daemon_executor() -> None:
    executor = DaemonThreadPoolExecutor(2, thread_name_prefix="t")
    release = threading.Event()
    busy = [executor.submit(release.wait, 10) for _ in range(2)]
    wait_until(lambda: all(f.running() for f in busy), 5, "both threads to be busy")
    queued = executor.submit(lambda: "never")
    failing = executor.submit(int, "x")
    assert not failing.done()  # both threads are busy
    executor.shutdown(wait=False, cancel_futures=True)
    assert queued.cancelled() and failing.cancelled()
    release.set()
    assert [f.result(5) for f in busy] == [True, True]
    with pytest.raises(RuntimeError):
        executor.submit(int, "1")
    executor2 = DaemonThreadPoolExecutor(1)
    with pytest.raises(ValueError):
        executor2.submit(int, "x").result(5)
    assert executor2.submit(int, "7").result(5) == 7  # the idle thread is reused
    assert len(executor2._daemons) == 1
    executor2.shutdown()


# -- a worker subprocess ---------------------------------------------------------------


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[PoolFleet]:
    fleet = PoolFleet(tmp_path)
    yield fleet
    fleet.close()


def test_worker_runs_async_tasks_at_once(fleet: PoolFleet) -> None:
    fleet.start("asyncio", "-c", "50")
    proj = fleet.module
    naps = [proj.anap.delay(n, 0.3) for n in range(50)]
    soft = proj.asoft.apply_async((10,), soft_time_limit=0.3)
    hard = proj.ahard.apply_async((10,), time_limit=0.3)
    assert proj.add.delay(1, 2).get(timeout=20) == 3  # a sync task, in the executor
    assert proj.loop_kind.delay().get(timeout=20) == ("uvloop" if HAS_UVLOOP else "asyncio")
    assert sorted(r.get(timeout=30) for r in naps) == list(range(50))
    assert max_overlap(fleet.lines()) >= 25
    assert soft.get(timeout=20) == "soft"
    with pytest.raises(TimeLimitExceeded):
        hard.get(timeout=20)


def test_worker_shutdown_cancels_and_requeues(fleet: PoolFleet) -> None:
    proc = fleet.start("asyncio", "-c", "4", "--soft-shutdown-timeout", "0.5")
    result = fleet.module.await_cancel.delay(3)
    wait_until(lambda: any(line.startswith("started") for line in fleet.lines()), 20,
               "the task to start")
    proc.terminate()
    assert proc.wait(30) == 0, fleet.log_text()
    assert "cancelled True shutdown" in fleet.lines()
    # Not finished, not acked (acks_late): the next worker runs it again, to the end.
    fleet.start("asyncio", "-c", "4")
    assert result.get(timeout=30) == "done"
    assert [line.split()[0] for line in fleet.lines()] == ["started", "cancelled", "started",
                                                           "done"]
