"""Remote control of a taskframe worker subprocess, on RabbitMQ and on Redis.

Each test names its own ``control_exchange`` and task queue, so workers of other tests never
answer. Results (and the shared revoke record) go to Redis.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import services
from workers import ProjectImport, WorkerProcs, read_lines, wait_until

pytestmark = [pytest.mark.redis, pytest.mark.rabbitmq]

PROJ_DIR = Path(__file__).resolve().parent / "controlproj"
NODE = f"tf@{socket.gethostname()}"


class Setup:
    """Broker, environment, worker processes and the in-process client of one test."""

    def __init__(self, broker: str, tmp_path: Path) -> None:
        tag = uuid.uuid4().hex[:8]
        self.broker = broker
        self.ns = f"tfctl{tag}"
        self.queue = f"ctlq-{tag}"
        self.record = tmp_path / "record.txt"
        self.statedb = tmp_path / "worker.state"
        self.env = {"CTL_BROKER": broker, "CTL_BACKEND": services.redis_url(),
                    "CTL_NS": self.ns, "CTL_QUEUE": self.queue, "CTL_RECORD": str(self.record)}
        self.workers = WorkerProcs(PROJ_DIR, "ctlproj", self.env, tmp_path)
        self.client = ProjectImport(PROJ_DIR, "ctlproj", self.env)
        self.tmp_path = tmp_path

    @property
    def app(self) -> Any:
        return self.client.module.app

    def start_worker(self, pool: str = "threads") -> None:
        n = len(self.workers.procs)
        self.workers.start("-P", pool, "-c", "2", "-n", NODE, "--statedb", str(self.statedb))
        wait_until(lambda: self.workers.logs[n].exists() and
                   " ready" in self.workers.logs[n].read_text(), 60, "the worker")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "taskframe", "-A", "ctlproj", *args],
                              env=self.workers.env, cwd=self.tmp_path, capture_output=True,
                              text=True, timeout=60)

    def close(self) -> None:
        self.workers.stop()
        self.client.close()
        services.drop_broker_names(self.broker, queues=[self.queue], exchanges=[
            self.queue, f"{self.ns}.pidbox", f"reply.{self.ns}.pidbox"])


@pytest.fixture(params=["amqp", "redis"])
def setup(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Setup]:
    broker = services.rabbitmq_url() if request.param == "amqp" else services.redis_url()
    setup = Setup(broker, tmp_path)
    try:
        yield setup
    finally:
        setup.close()


def test_inspect_and_control_a_running_worker(setup: Setup) -> None:
    setup.start_worker()
    control = setup.app.control
    assert control.ping(destination=[NODE], timeout=10) == [{NODE: {"ok": "pong"}}]
    inspect = control.inspect(destination=[NODE], timeout=10)

    registered = inspect.registered()[NODE]
    assert {"ctl.add", "ctl.record", "ctl.sleep"} <= {r.split(" ")[0] for r in registered}

    assert setup.client.module.add.delay(2, 3).get(timeout=30) == 5
    long = setup.client.module.sleep.delay(60)
    def running() -> list[dict[str, Any]]:
        return [r for r in (inspect.active() or {}).get(NODE, []) if r["acknowledged"]]

    wait_until(running, 30, "the task to be active and acknowledged")
    [info] = running()
    assert info["id"] == long.id and info["name"] == "ctl.sleep" and info["args"] == [60]
    assert info["time_start"] is not None and info["hostname"] == NODE
    assert inspect.query_task(long.id)[NODE][long.id][0] == "active"

    stats = inspect.stats()[NODE]
    assert stats["total"].get("ctl.add") == 1
    assert stats["pool"]["max-concurrency"] == 2
    assert {"pid", "clock", "uptime", "broker", "prefetch_count", "rusage"} <= set(stats)
    [queue] = inspect.active_queues()[NODE]
    assert queue["name"] == setup.queue

    # terminate on threads is cooperative: the task sees should_abort() and returns
    replies = control.revoke(long.id, terminate=True, signal="SIGKILL", destination=[NODE],
                             reply=True, timeout=10)
    assert replies == [{NODE: {"ok": f"terminate: {long.id}"}}]
    assert long.get(timeout=30) == "aborted: revoked"
    assert long.id in inspect.revoked()[NODE]
    assert long.id in json.loads(setup.statedb.read_text())["revoked"]

    # the CLI: readable and --json, exit 0 with a node
    out = setup.cli("inspect", "ping", "-d", NODE, "--timeout", "10", "--json")
    assert out.returncode == 0 and json.loads(out.stdout) == {NODE: {"ok": "pong"}}, out
    out = setup.cli("status", "-d", NODE, "--timeout", "10")
    assert out.returncode == 0 and f"{NODE}: OK" in out.stdout, out


def test_every_other_command_answers(setup: Setup) -> None:
    """The inspect and control commands the test above does not cover, on this broker."""
    setup.start_worker()
    control = setup.app.control
    inspect = control.inspect(destination=[NODE], timeout=10)
    only = {"destination": [NODE], "reply": True, "timeout": 10}

    def ok(replies: Any) -> str:
        [reply] = replies
        assert "ok" in reply[NODE], reply
        return str(reply[NODE]["ok"])

    assert inspect.reserved() == {NODE: []}
    assert inspect.scheduled() == {NODE: []}
    assert inspect.conf()[NODE]["task_default_queue"] == setup.queue
    assert isinstance(inspect.clock()[NODE]["clock"], int)
    assert f"({NODE})" in inspect.report()[NODE]["ok"]

    assert ok(control.rate_limit("ctl.add", "100/s", **only)) == "new rate limit set successfully"
    assert ok(control.time_limit("ctl.add", soft=20, hard=30, **only)) == \
        "time limits set successfully"
    assert "rate_limit=100/s" in " ".join(inspect.registered("rate_limit")[NODE])
    assert setup.client.module.add.delay(1, 1).get(timeout=30) == 2

    extra = f"{setup.queue}-extra"
    assert ok(control.add_consumer(extra, **only)) == f"add consumer {extra}"
    wait_until(lambda: extra in {q["name"] for q in inspect.active_queues()[NODE]}, 30,
               "the new queue to be consumed")
    assert setup.client.module.add.apply_async((2, 2), queue=extra).get(timeout=30) == 4
    assert ok(control.cancel_consumer(extra, **only)) == f"no longer consuming from {extra}"
    wait_until(lambda: extra not in {q["name"] for q in inspect.active_queues()[NODE]}, 30,
               "the queue to be cancelled")
    services.drop_broker_names(setup.broker, queues=[extra], exchanges=[extra])

    assert ok(control.pool_grow(2, **only)) == "pool will grow"
    wait_until(lambda: inspect.stats()[NODE]["pool"]["max-concurrency"] == 4, 30, "the grow")
    assert ok(control.pool_shrink(1, **only)) == "pool will shrink"
    wait_until(lambda: inspect.stats()[NODE]["pool"]["max-concurrency"] == 3, 30, "the shrink")

    assert "revoked" in ok(control.revoke_by_stamped_headers({"tenant": "t1"}, **only))

    for command in (control.enable_events, control.heartbeat, control.disable_events):
        [reply] = command(**only)
        assert NODE in reply, (command, reply)

    control.shutdown(destination=[NODE])
    wait_until(lambda: all(p.poll() is not None for p in setup.workers.procs), 30,
               "the worker to exit after shutdown")
    assert control.ping(destination=[NODE], timeout=1) == []


def test_revoke_while_no_worker_runs(setup: Setup) -> None:
    record = setup.client.module.record
    task_id = str(uuid.uuid4())
    # No worker is running: nobody replies, the revoke is kept in the result backend.
    out = setup.cli("revoke", task_id, "--timeout", "0.5")
    assert out.returncode == 0, out
    assert "later" in out.stderr
    record.apply_async(("revoked",), task_id=task_id)

    setup.start_worker()
    assert record.delay("after").get(timeout=30) == "after"
    assert read_lines(setup.record) == ["after"], setup.workers.log_text()
    assert setup.app.AsyncResult(task_id).state == "REVOKED"
    inspect = setup.app.control.inspect(destination=[NODE], timeout=10)
    assert task_id in inspect.revoked()[NODE]

    # a revoked ETA task is checked again when it is due
    later = record.apply_async(("eta",), countdown=1)
    later.revoke()
    wait_until(lambda: later.id in inspect.revoked()[NODE], 30, "the revoke to arrive")
    assert record.apply_async(("eta-ok",), countdown=1).get(timeout=30) == "eta-ok"
    assert setup.app.AsyncResult(later.id).state == "REVOKED"
    assert read_lines(setup.record) == ["after", "eta-ok"]
    assert "Discarding revoked task" in setup.workers.log_text()


def test_no_node_means_non_zero_exit(setup: Setup) -> None:
    out = setup.cli("inspect", "ping", "--timeout", "0.3")
    assert out.returncode == 69
    assert "No nodes replied" in out.stderr


@pytest.mark.parametrize("pool", ["prefork", "gevent", "eventlet", "asyncio"])
def test_terminate_stops_the_task_on_each_pool(tmp_path: Path, pool: str) -> None:
    setup = Setup(services.redis_url(), tmp_path)
    try:
        setup.start_worker(pool)
        task = setup.client.module.asleep if pool == "asyncio" else setup.client.module.sleep
        long = task.delay(60)
        inspect = setup.app.control.inspect(destination=[NODE], timeout=10)
        wait_until(lambda: [r for r in inspect.active()[NODE] if r["acknowledged"]], 30,
                   "the task to run")
        if pool == "prefork":
            [info] = inspect.active()[NODE]
            assert info["worker_pid"] in inspect.stats()[NODE]["pool"]["processes"]
        replies = setup.app.control.revoke(long.id, terminate=True, signal="SIGKILL",
                                           destination=[NODE], reply=True, timeout=10)
        assert replies == [{NODE: {"ok": f"terminate: {long.id}"}}]
        wait_until(lambda: long.state == "REVOKED", 30, "the task to be terminated")
    finally:
        setup.close()


def test_scheduled_task_is_listed_then_skipped_when_revoked(tmp_path: Path) -> None:
    # On RabbitMQ classic queues the worker holds ETA tasks itself: they show as scheduled.
    setup = Setup(services.rabbitmq_url(), tmp_path)
    try:
        setup.start_worker()
        record = setup.client.module.record
        later = record.apply_async(("later",), countdown=1.5)
        inspect = setup.app.control.inspect(destination=[NODE], timeout=10)
        wait_until(lambda: inspect.scheduled()[NODE], 30, "the task to be scheduled")
        [entry] = inspect.scheduled()[NODE]
        assert entry["request"]["id"] == later.id and entry["eta"] is not None
        assert inspect.query_task(later.id)[NODE][later.id][0] == "scheduled"
        later.revoke()
        wait_until(lambda: later.id in inspect.revoked()[NODE], 30, "the revoke")
        assert record.apply_async(("ok",), countdown=1.5).get(timeout=30) == "ok"
        assert read_lines(setup.record) == ["ok"]
        assert later.state == "REVOKED"
    finally:
        setup.close()
