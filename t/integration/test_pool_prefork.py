"""The prefork pool: real child processes, real time limits, real SIGKILLs.

Worker tests run ``taskframe worker -P prefork -c 2`` subprocesses on the embedded SQLite
broker and results file (``t/integration/preforkproj/pfproj.py``); the pool tests drive a
``PreforkPool`` of this process directly, with an app whose results go to a SQLite file.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from workers import ProjectImport, WorkerProcs, read_lines, wait_until

from taskframe import Taskframe, signals, states
from taskframe.context import Context
from taskframe.errors import BackendError, TimeLimitExceeded, WorkerLostError
from taskframe.execution.outcome import Outcome
from taskframe.pools import PreforkPool, TaskJob, get_pool_class

PROJ_DIR = Path(__file__).parent / "preforkproj"


# -- a real worker ------------------------------------------------------------------------


class Fleet:
    """The client (``pfproj`` imported here), the worker processes, the record file."""

    def __init__(self, tmp_path: Path) -> None:
        db = tmp_path / "broker.sqlite3"
        self.record = tmp_path / "record.txt"
        env = {"TASKFRAME_BROKER_URL": f"sqlite:///{db}",
               "TASKFRAME_RESULT_BACKEND": f"db+sqlite:///{db}",
               "PFPROJ_RECORD": str(self.record)}
        self.project = ProjectImport(PROJ_DIR, "pfproj", env)
        self.workers = WorkerProcs(PROJ_DIR, "pfproj", env, tmp_path)

    @property
    def mod(self) -> ModuleType:
        return self.project.module

    def lines(self) -> list[str]:
        return read_lines(self.record)

    def ready(self) -> None:
        """Block until the worker answers (import, fork, first poll)."""
        assert self.mod.add.delay(1, 1).get(timeout=30) == 2, self.workers.log_text()

    def close(self) -> None:
        self.workers.stop()
        self.project.close()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path_factory.mktemp("prefork"))
    fleet.workers.start("-P", "prefork", "-c", "2", "--max-tasks-per-child", "2",
                        "--soft-time-limit", "20", "--time-limit", "30")
    try:
        fleet.ready()
        yield fleet
    finally:
        fleet.close()


def test_results_round_trip_from_children(fleet: Fleet) -> None:
    results = [fleet.mod.add.delay(n, n) for n in range(10)]
    assert [r.get(timeout=20) for r in results] == [2 * n for n in range(10)]
    pids = {fleet.mod.pid.delay().get(timeout=20) for _ in range(3)}
    assert os.getpid() not in pids
    assert all(f"init {p}" in fleet.lines() for p in pids)  # worker_process_init ran there


def test_max_tasks_per_child_replaces_children(fleet: Fleet) -> None:
    pids = [fleet.mod.pid.delay().get(timeout=20) for _ in range(6)]
    assert max(pids.count(p) for p in pids) <= 2, pids
    assert len(set(pids)) >= 3, pids
    # the retired children ran worker_process_shutdown on their way out
    wait_until(lambda: sum(line.startswith("down ") for line in fleet.lines()) >= 2, 10,
               "worker_process_shutdown lines")


def test_soft_time_limit_is_caught_by_the_task(fleet: Fleet) -> None:
    assert fleet.mod.soft.delay(10).get(timeout=20) == "caught"


def test_hard_time_limit_fails_the_task_and_the_pool_goes_on(fleet: Fleet) -> None:
    result = fleet.mod.hard.delay(10)
    exc = result.get(timeout=20, propagate=False)
    assert isinstance(exc, TimeLimitExceeded), exc
    assert result.state == states.FAILURE
    assert str(exc) == "TimeLimitExceeded(1.0,)"
    assert [fleet.mod.add.delay(2, n).get(timeout=20) for n in range(4)] == [2, 3, 4, 5]


def test_hard_time_limit_calls_the_errbacks(fleet: Fleet) -> None:
    # The parent settles a killed child's run as the body's own failure would be.
    result = fleet.mod.hard.apply_async((10,), link_error=fleet.mod.record_errback.s())
    assert isinstance(result.get(timeout=20, propagate=False), TimeLimitExceeded)
    wait_until(lambda: f"errback {result.id}" in fleet.lines(), 20, "the errback")


def test_killed_child_fails_its_task_with_worker_lost(fleet: Fleet) -> None:
    n = 1000 + int(uuid.uuid4().int % 1000)
    result = fleet.mod.blocker.delay(n, 60)
    wait_until(lambda: fleet.mod.starts(n), 20, "the blocker to start")
    os.kill(fleet.mod.starts(n)[0], signal.SIGKILL)
    exc = result.get(timeout=20, propagate=False)
    assert isinstance(exc, WorkerLostError), exc
    assert "Worker exited prematurely: signal 9 (SIGKILL)" in str(exc)
    assert fleet.mod.add.delay(3, 4).get(timeout=20) == 7  # replaced


def test_reject_on_worker_lost_runs_the_task_again(fleet: Fleet) -> None:
    n = 3000 + int(uuid.uuid4().int % 1000)
    result = fleet.mod.requeue_me.delay(n)
    wait_until(lambda: fleet.mod.starts(n), 20, "the first run")
    os.kill(fleet.mod.starts(n)[0], signal.SIGKILL)
    assert result.get(timeout=30) == "again"
    assert len(fleet.mod.starts(n)) == 2


def test_async_task_runs_in_a_child(fleet: Fleet) -> None:
    assert fleet.mod.async_add.delay(2, 3).get(timeout=20) == 5


def test_warm_shutdown_asks_prefork_tasks_to_abort(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    try:
        proc = fleet.workers.start("-P", "prefork", "-c", "2", "--soft-shutdown-timeout", "1")
        fleet.ready()
        result = fleet.mod.abortable.delay(7)
        coroutine = fleet.mod.async_sleeper.delay(8)
        wait_until(lambda: fleet.mod.starts(7) and fleet.mod.starts(8), 20, "the tasks to start")
        proc.send_signal(signal.SIGTERM)
        assert result.get(timeout=20) == "shutdown"  # should_abort() / abort_reason
        assert proc.wait(timeout=20) == 0, fleet.workers.log_text()
        assert "cancelled 8" in fleet.lines()  # asyncio.CancelledError in the async task
        # ... whose message went back to the queue: the next worker runs it again
        fleet.workers.start("-P", "prefork", "-c", "2")
        assert coroutine.get(timeout=30) == "second"
        assert len(fleet.mod.starts(7)) == 1
    finally:
        fleet.close()


# -- the pool in this process -------------------------------------------------------------


class Calls:
    """``on_accepted`` / ``on_done`` of the jobs, waitable."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.accepted: dict[str, int | None] = {}
        self.done: dict[str, list[Outcome]] = {}

    def on_accepted(self, job: TaskJob) -> None:
        with self.cond:
            self.accepted[job.id] = job.pid
            self.cond.notify_all()

    def on_done(self, job: TaskJob, outcome: Outcome) -> None:
        with self.cond:
            self.done.setdefault(job.id, []).append(outcome)
            self.cond.notify_all()

    def wait(self, table: dict[str, Any], task_id: str, timeout: float = 20) -> Any:
        with self.cond:
            if not self.cond.wait_for(lambda: task_id in table, timeout):
                raise AssertionError(f"timed out waiting for {task_id}")
            return table[task_id]


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Taskframe]:
    app = Taskframe("pftest", broker="memory://", backend=f"db+sqlite:///{tmp_path}/r.db",
                    set_as_current=False)

    @app.task(name="pftest.sleepy")
    def sleepy(seconds: float) -> str:
        time.sleep(seconds)
        return "slept"

    @app.task(name="pftest.until_abort", bind=True)
    def until_abort(self: Any) -> str | None:
        while not self.request.should_abort():
            time.sleep(0.02)
        return self.request.abort_reason

    @app.task(name="pftest.pid")
    def pid() -> int:
        return os.getpid()

    yield app
    app.close()


def _job(app: Taskframe, calls: Calls, name: str, *args: Any) -> TaskJob:
    task_id = str(uuid.uuid4())
    ctx = Context(id=task_id, task=name, args=list(args), called_directly=False)
    return TaskJob(task=app.tasks[name], context=ctx, store=True,
                   on_accepted=calls.on_accepted, on_done=calls.on_done)


def test_prefork_is_registered() -> None:
    assert get_pool_class("prefork") is PreforkPool
    assert PreforkPool.enforces_time_limits


def test_terminate_revokes_the_task_and_replaces_the_child(app: Taskframe) -> None:
    calls, pool = Calls(), PreforkPool(1, app=app)
    pool.start()
    try:
        job = _job(app, calls, "pftest.sleepy", 30)
        pool.submit(job)
        child_pid = calls.wait(calls.accepted, job.id)
        assert pool.processes() == [child_pid]
        assert pool.terminate(job, signal.SIGTERM) is True
        outcome = calls.wait(calls.done, job.id)
        assert outcome[0].state == states.REVOKED
        assert app.AsyncResult(job.id).state == states.REVOKED
        wait_until(lambda: pool.processes() and pool.processes() != [child_pid], 10,
                   "a new child")
        again = _job(app, calls, "pftest.pid")
        pool.submit(again)
        assert calls.wait(calls.done, again.id)[0].retval not in (child_pid, os.getpid())
        time.sleep(0.2)
        assert len(calls.done[job.id]) == 1  # on_done exactly once
    finally:
        pool.stop(timeout=5)


def test_abort_reaches_the_task_in_the_child(app: Taskframe) -> None:
    calls, pool = Calls(), PreforkPool(2, app=app)
    pool.start()
    try:
        job = _job(app, calls, "pftest.until_abort")
        pool.submit(job)
        calls.wait(calls.accepted, job.id)
        # Not "revoked": asked before the body starts (the job may still be in the pipe),
        # that one means "do not run it" (execution.revoked).
        pool.abort(job, "shutdown")
        outcome = calls.wait(calls.done, job.id)[0]
        assert (outcome.state, outcome.retval) == (states.SUCCESS, "shutdown")
        assert app.AsyncResult(job.id).get(timeout=5) == "shutdown"
    finally:
        pool.stop(timeout=5)


def test_memory_limit_grow_shrink_and_child_signals(app: Taskframe, tmp_path: Path) -> None:
    record = tmp_path / "children.txt"

    def write(line: str) -> None:
        with record.open("a") as f:
            f.write(line + "\n")

    def on_init(**_: Any) -> None:
        write(f"init {os.getpid()}")

    def on_down(pid: int, exitcode: int, **_: Any) -> None:
        write(f"down {pid} {exitcode}")

    signals.worker_process_init.connect(on_init)
    signals.worker_process_shutdown.connect(on_down)
    app.on_worker_start(lambda: write(f"hook-start {os.getpid()}"))
    app.on_worker_stop(lambda: write(f"hook-stop {os.getpid()}"))
    app.conf.worker_max_memory_per_child = 1  # KiB: every task leaves a child above it
    calls, pool = Calls(), PreforkPool(1, app=app)
    try:
        pool.start()
        pids = []
        for _ in range(3):
            job = _job(app, calls, "pftest.pid")
            pool.submit(job)
            pids.append(calls.wait(calls.done, job.id)[0].retval)
        assert len(set(pids)) == 3, pids
        pool.grow(2)
        assert pool.concurrency == 3
        wait_until(lambda: len(pool.processes()) == 3, 10, "three children")
        assert pool.stats()["processes"] == pool.processes()
        pool.shrink(2)
        wait_until(lambda: len(pool.processes()) == 1, 10, "one child")
        pool.stop(timeout=5)
        assert pool.processes() == []
        lines = read_lines(record)
        for child in pids:  # signals and start/stop hooks ran in each child
            for line in (f"init {child}", f"down {child} 0", f"hook-start {child}",
                         f"hook-stop {child}"):
                assert line in lines, lines
        assert f"hook-start {os.getpid()}" not in lines
    finally:
        signals.worker_process_init.disconnect(on_init)
        signals.worker_process_shutdown.disconnect(on_down)
        pool.stop(timeout=1)


def test_failing_start_hook_in_a_child_stops_the_worker(app: Taskframe) -> None:
    @app.on_worker_start
    def broken() -> None:
        raise ConnectionError("no database")

    pool = PreforkPool(2, app=app)
    pool.start()
    try:
        pool.run_hooks(app.worker_stop_hooks)  # stop hooks: nothing runs in the parent
        with pytest.raises(RuntimeError, match="no database"):
            pool.run_hooks(app.worker_start_hooks)
        wait_until(lambda: not pool.processes(), 10, "the children to exit")
    finally:
        pool.stop(timeout=1)


def test_a_result_store_down_at_a_hard_time_limit_does_not_stop_the_pool(
        app: Taskframe, monkeypatch: pytest.MonkeyPatch) -> None:
    """The parent stores the failure of a child it killed (hard time limit) or lost: with
    the store down, that raised in the supervisor thread, which died; no job of the pool
    was reported again. Now the job ends FAILURE all the same and the pool goes on."""
    calls, pool = Calls(), PreforkPool(1, app=app)
    pool.start()
    try:
        warm = _job(app, calls, "pftest.pid")
        pool.submit(warm)
        calls.wait(calls.done, warm.id)

        def store_down(*args: Any, **kwargs: Any) -> None:
            raise BackendError("the result store is down")

        monkeypatch.setattr(app.backend, "mark_as_failure", store_down)
        limited = _job(app, calls, "pftest.sleepy", 30)
        limited.time_limit = 0.5
        pool.submit(limited)
        outcome = calls.wait(calls.done, limited.id)[0]
        assert outcome.state == states.FAILURE
        assert isinstance(outcome.retval, TimeLimitExceeded)
        lost = _job(app, calls, "pftest.sleepy", 30)
        pool.submit(lost)
        os.kill(calls.wait(calls.accepted, lost.id), signal.SIGKILL)
        outcome = calls.wait(calls.done, lost.id)[0]
        assert (outcome.state, type(outcome.retval)) == (states.FAILURE, WorkerLostError)
        after = _job(app, calls, "pftest.pid")
        pool.submit(after)
        assert calls.wait(calls.done, after.id)[0].state == states.SUCCESS
    finally:
        pool.stop(timeout=5)
