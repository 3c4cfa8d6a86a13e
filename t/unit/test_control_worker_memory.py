"""Remote control of an in-process worker on the memory broker: revoke, terminate, statedb."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from workers import InlineWorkers

from taskframe import GroupResult, Task, Taskframe, states
from taskframe.control.revoked import StateDB, store_for
from taskframe.worker.worker import Worker

NODE = "mem@example"


@pytest.fixture
def app() -> Iterator[Taskframe]:
    app = Taskframe("cwm", broker=f"memory://{uuid.uuid4().hex}", backend="memory://",
                    set_as_current=False)
    yield app
    app.close()


@pytest.fixture
def run_worker(app: Taskframe) -> Iterator[Any]:
    workers = InlineWorkers(app, hostname=NODE)

    def start(**kwargs: Any) -> Worker:
        worker = workers.start(**kwargs)
        deadline = time.monotonic() + 10
        while not app.control.ping(destination=[NODE], timeout=0.5):
            assert time.monotonic() < deadline, "the worker never answered"
        return worker

    yield start
    workers.stop_all()


def wait_for(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + 10
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.parametrize("pool", ["solo", "threads"])
def test_terminate_is_cooperative_on_threads_and_solo(app: Taskframe, run_worker: Any,
                                                       pool: str) -> None:
    started = threading.Event()

    @app.task(bind=True)
    def slow(self: Task[Any, Any]) -> str:
        started.set()
        while not self.request.should_abort():
            time.sleep(0.01)
        return f"stopped: {self.request.abort_reason}"

    run_worker(pool=pool)
    result = slow.delay()
    assert started.wait(10)
    reply = app.control.terminate(result.id, destination=[NODE], reply=True, timeout=10)
    assert reply == [{NODE: {"ok": f"terminate: {result.id}"}}]
    assert result.get(timeout=10) == "stopped: revoked"


def test_revoked_task_is_skipped_and_marked(app: Taskframe, run_worker: Any) -> None:
    ran: list[str] = []

    @app.task
    def note(value: str) -> str:
        ran.append(value)
        return value

    run_worker()
    task_id = str(uuid.uuid4())
    app.control.revoke(task_id, destination=[NODE], reply=True, timeout=10)
    note.apply_async(("revoked",), task_id=task_id)
    assert note.delay("after").get(timeout=10) == "after"
    wait_for(lambda: app.AsyncResult(task_id).state == states.REVOKED, "REVOKED")
    assert ran == ["after"]
    # a finished result is never overwritten by a later revoke
    done = note.delay("done")
    assert done.get(timeout=10) == "done"
    app.control.revoke(done.id, destination=[NODE], reply=True, timeout=10)
    assert app.AsyncResult(done.id).state == states.SUCCESS


def test_group_result_revokes_every_member(app: Taskframe, run_worker: Any) -> None:
    ran: list[int] = []

    @app.task
    def note(value: int) -> int:
        ran.append(value)
        return value

    run_worker()
    ids = [str(uuid.uuid4()) for _ in range(3)]
    group = GroupResult(str(uuid.uuid4()), [app.AsyncResult(i) for i in ids], app=app)
    group.revoke(wait=True, timeout=10)
    for n, task_id in enumerate(ids):
        note.apply_async((n,), task_id=task_id)
    assert note.delay(99).get(timeout=10) == 99
    wait_for(lambda: all(r.state == states.REVOKED for r in group.results), "REVOKED")
    assert ran == [99]


def test_revokes_survive_a_restart(app: Taskframe, run_worker: Any, tmp_path: Path) -> None:
    @app.task
    def noop() -> None:
        return None

    statedb = tmp_path / "w.state"
    app.conf.worker_state_db = str(statedb)
    worker = run_worker()
    app.control.revoke("early", destination=[NODE], reply=True, timeout=10)
    worker.stop()
    wait_for(lambda: "early" in StateDB(str(statedb)).load(), "the state db")

    # recorded by the client with no worker running: loaded by the next worker
    app.control.revoke("while-down", reply=False)
    store = store_for(app)
    assert store is not None and "while-down" in store.load()
    run_worker()
    revoked = app.control.inspect(destination=[NODE], timeout=10).revoked()
    assert revoked is not None and {"early", "while-down"} <= set(revoked[NODE])


def test_pool_resize_and_rate_limit(app: Taskframe, run_worker: Any) -> None:
    @app.task(name="cwm.add")
    def add(x: int, y: int) -> int:
        return x + y

    run_worker(pool="threads", concurrency=2)
    inspect = app.control.inspect(destination=[NODE], timeout=10)
    assert app.control.pool_grow(2, destination=[NODE], reply=True, timeout=10) == \
        [{NODE: {"ok": "pool will grow"}}]
    wait_for(lambda: (inspect.stats() or {})[NODE]["pool"]["max-concurrency"] == 4,
             "the pool to grow")
    reply = app.control.rate_limit("cwm.add", "100/s", destination=[NODE], reply=True,
                                   timeout=10)
    assert reply == [{NODE: {"ok": "new rate limit set successfully"}}]
    assert add.delay(1, 2).get(timeout=10) == 3
    stats = inspect.stats()
    assert stats is not None and stats[NODE]["total"] == {"cwm.add": 1}


def test_cli_commands(app: Taskframe, run_worker: Any) -> None:
    from click.testing import CliRunner

    from taskframe.cli.main import main

    @app.task(name="cwm.mul")
    def mul(x: int, y: int) -> int:
        return x * y

    run_worker()
    runner = CliRunner()
    broker = ["-b", app.broker_url]

    def cli(*args: str) -> Any:
        return runner.invoke(main, [*broker, *args], catch_exceptions=False)

    out = cli("inspect", "ping", "-d", NODE, "--json")
    assert out.exit_code == 0 and out.output.strip() == '{"mem@example": {"ok": "pong"}}'
    out = cli("inspect", "registered", "-d", NODE)
    assert out.exit_code == 0 and f"->  {NODE}: OK" in out.output and "* cwm.mul" in out.output
    out = cli("control", "rate_limit", "cwm.mul", "10/m", "-d", NODE)
    assert out.exit_code == 0 and "new rate limit set successfully" in out.output
    assert app.tasks["cwm.mul"].rate_limit == "10/m"
    out = cli("control", "time_limit", "cwm.mul", "1.5", "3", "-d", NODE, "--json")
    assert out.exit_code == 0, out.output
    assert app.tasks["cwm.mul"].time_limit == 3.0
    out = cli("revoke", "id-1", "id-2", "-d", NODE)
    assert out.exit_code == 0 and "flagged as revoked" in out.output
    out = cli("inspect", "revoked", "-d", NODE, "--json")
    assert {"id-1", "id-2"} <= set(json.loads(out.output)[NODE])
    out = cli("status", "-d", NODE)
    assert out.exit_code == 0 and f"{NODE}: OK" in out.output
    out = cli("inspect", "ping", "-d", "nobody@nowhere", "--timeout", "0.2")
    assert out.exit_code == 69
    out = cli("control", "pool_grow", "x")
    assert out.exit_code == 64 and "n must be a number" in out.output



def test_shutdown_command_stops_the_worker(app: Taskframe, run_worker: Any) -> None:
    worker = run_worker()
    assert app.control.shutdown(destination=[NODE]) == []
    wait_for(lambda: worker.consumer is not None and worker.consumer.stopping, "the shutdown")
    deadline = time.monotonic() + 10
    while app.control.ping(destination=[NODE], timeout=0.2):
        assert time.monotonic() < deadline, "the worker still answers"


def test_pool_resize_on_solo_answers_with_an_error(app: Taskframe, run_worker: Any) -> None:
    run_worker(pool="solo")
    [reply] = app.control.pool_grow(1, destination=[NODE], reply=True, timeout=10)
    assert reply[NODE] == {"error": "pool_grow is not supported by this pool"}
    [reply] = app.control.pool_shrink(1, destination=[NODE], reply=True, timeout=10)
    assert reply[NODE] == {"error": "pool_shrink is not supported by this pool"}
    stats = app.control.inspect(destination=[NODE], timeout=10).stats()
    assert stats[NODE]["pool"]["max-concurrency"] == 1
