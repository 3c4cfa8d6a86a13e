"""A taskframe worker subprocess sends Celery's events; ``taskframe events`` prints them;
``--health-file`` / ``--health-port`` report liveness."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import services
from workers import ProjectImport, WorkerProcs, wait_until

from taskframe.events import EventReceiver, event_exchange
from taskframe.transport import Connection

pytestmark = [pytest.mark.redis, pytest.mark.rabbitmq]

PROJ_DIR = Path(__file__).parent / "eventsproj"


@dataclass
class Setup:
    url: str
    exchange: str
    env: dict[str, str]
    project: ProjectImport
    workers: WorkerProcs
    pool: str = "threads"

    def receiver(self) -> EventReceiver:
        receiver = EventReceiver(Connection(self.url),
                                 exchange=event_exchange(self.url, self.exchange))
        receiver.consume()
        return receiver


def _cleanup(kind: str, url: str, exchange: str, queue: str) -> None:
    services.drop_broker_names(url, queues=[queue], exchanges=[exchange, queue])


def _setup(kind: str, tmp_path: Path) -> Iterator[Setup]:
    url = services.rabbitmq_url() if kind == "amqp" else services.redis_url()
    exchange = f"tfevw-{uuid.uuid4().hex[:8]}"
    queue = f"tfevwq-{uuid.uuid4().hex[:8]}"
    env = {"EVPROJ_BROKER": url, "EVPROJ_EXCHANGE": exchange, "EVPROJ_QUEUE": queue}
    project = ProjectImport(PROJ_DIR, "evproj", env)
    workers = WorkerProcs(PROJ_DIR, "evproj", env, tmp_path)
    yield Setup(url, exchange, env, project, workers)
    workers.stop()
    project.close()
    _cleanup(kind, url, exchange, queue)


@pytest.fixture(params=["amqp-threads", "redis-threads", "redis-prefork"])
def setup(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Setup]:
    kind, pool = request.param.split("-")
    for each in _setup(kind, tmp_path):
        each.pool = pool
        yield each


@pytest.fixture
def redis_setup(tmp_path: Path) -> Iterator[Setup]:
    yield from _setup("redis", tmp_path)


def _until(receiver: EventReceiver, events: list[dict[str, Any]], done: Any, what: str,
           workers: WorkerProcs, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; got "
                                 f"{[e['type'] for e in events]}\n{workers.log_text()}")
        events += receiver.poll(0.3)


def _types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


def test_worker_with_E_sends_celery_worker_and_task_events(setup: Setup) -> None:
    receiver = setup.receiver()
    events: list[dict[str, Any]] = []
    try:
        setup.workers.start("-E", "-P", setup.pool, "-c", "2", "--heartbeat-interval", "0.5")
        _until(receiver, events, lambda: "worker-heartbeat" in _types(events),
               "worker-online and a heartbeat", setup.workers)
        app = setup.project.module.app
        app.conf.task_send_sent_event = True
        ok = setup.project.module.add.delay(2, 3).id
        bad = setup.project.module.fail.delay("boom").id

        def finished() -> bool:
            done = {(e.get("uuid"), e["type"]) for e in events}
            return (ok, "task-succeeded") in done and (bad, "task-failed") in done \
                and (ok, "task-sent") in done

        _until(receiver, events, finished, "the tasks' events", setup.workers)
        setup.workers.stop()
        _until(receiver, events, lambda: "worker-offline" in _types(events),
               "worker-offline", setup.workers)
    finally:
        receiver.close()
    hostname = next(e["hostname"] for e in events if e["type"] == "worker-online")
    assert hostname.startswith("w0@")
    for event in events:
        for key in ("type", "hostname", "timestamp", "utcoffset", "pid", "clock"):
            assert key in event, (key, event)
    online = next(e for e in events if e["type"] == "worker-online")
    assert online["sw_ident"] == "py-taskframe" and online["freq"] == 0.5
    assert len(online["loadavg"]) == 3
    assert {"active", "processed", "sw_ver", "sw_sys"} <= set(online)
    by_type = {e["type"]: e for e in events if e.get("uuid") == ok}
    assert set(by_type) == {"task-sent", "task-received", "task-started", "task-succeeded"}
    sent = by_type["task-sent"]
    assert sent["name"] == "evproj.add" and sent["queue"] == setup.env["EVPROJ_QUEUE"]
    assert sent["args"] == "(2, 3)"  # the argsrepr header
    received = by_type["task-received"]
    assert received["hostname"] == hostname
    assert received["name"] == "evproj.add" and received["args"] == sent["args"]
    assert {"kwargs", "root_id", "parent_id", "retries", "eta", "expires"} <= set(received)
    succeeded = by_type["task-succeeded"]
    assert succeeded["result"] == "5" and isinstance(succeeded["runtime"], float)
    failed = next(e for e in events if e.get("uuid") == bad and e["type"] == "task-failed")
    assert failed["exception"] == "ValueError('boom')"
    assert "ValueError: boom" in failed["traceback"]
    last_beat = [e for e in events if e["type"] == "worker-heartbeat"][-1]
    assert last_beat["processed"] >= 1 or last_beat["active"] >= 0
    assert _types(events).index("worker-offline") > _types(events).index("task-succeeded")


def test_events_command_health_file_and_port_without_E(
        redis_setup: Setup, tmp_path: Path) -> None:
    setup = redis_setup
    cli = subprocess.Popen(
        [sys.executable, "-m", "taskframe", "-A", "evproj", "events", "--timeout", "60"],
        env=setup.workers.env, cwd=PROJ_DIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )
    health = tmp_path / "alive"
    try:
        assert cli.stderr is not None and cli.stdout is not None
        assert "receiving events" in cli.stderr.readline()
        setup.workers.start("--heartbeat-interval", "0.5", "--health-file", str(health),
                            "--health-port", "0")
        log = setup.workers.logs[0]
        wait_until(lambda: re.search(r"health: serving on \S+:(\d+)", log.read_text()), 30,
                   "the health port in the log")
        match = re.search(r"health: serving on \S+:(\d+)", log.read_text())
        assert match is not None
        with urllib.request.urlopen(f"http://127.0.0.1:{match[1]}/", timeout=5) as resp:
            assert resp.status == 200 and json.loads(resp.read())["status"] == "ok"
        wait_until(health.exists, 30, "the health file")
        setup.project.module.add.delay(1, 1)
        lines: list[str] = []
        while not any(" worker-heartbeat " in line for line in lines):
            lines.append(cli.stdout.readline())
        setup.workers.stop()
        assert not health.exists()
        while not any(" worker-offline " in line for line in lines):
            line = cli.stdout.readline()
            assert line, f"events command ended early: {lines}"
            lines.append(line)
    finally:
        cli.terminate()
        cli.wait(10)
    online = next(line for line in lines if " worker-online " in line)
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} w0@\S+ worker-online ", online)
    assert not any(" task-" in line for line in lines), lines  # no -E: no task events


def test_health_port_says_503_while_the_consumer_loop_is_stuck(redis_setup: Setup) -> None:
    setup = redis_setup
    setup.workers.start("--health-port", "0", "--health-timeout", "1")
    log = setup.workers.logs[0]
    wait_until(lambda: re.search(r"health: serving on \S+:(\d+)", log.read_text()), 30,
               "the health port in the log")
    match = re.search(r"health: serving on \S+:(\d+)", log.read_text())
    assert match is not None
    url = f"http://127.0.0.1:{match[1]}/healthz"

    def status() -> int:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    wait_until(lambda: setup.workers.procs[0].poll() is not None or " ready" in log.read_text(),
               30, "the worker to be ready")
    assert status() == 200
    setup.project.module.stall_loop.delay(4)
    wait_until(lambda: status() == 503, 10, "the health check to report the stall")
    wait_until(lambda: status() == 200, 15, "the health check to recover")
