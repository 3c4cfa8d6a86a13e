"""Real worker processes on RabbitMQ: a dropped connection mid-run, an unreachable broker.

The connections are cut with ``rabbitmqctl close_connection`` on the ones this
test opened (named through the ``client_name`` transport option): the same
server-side close as ``close_all_connections``, without cutting the other tests
that share the broker.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import services

PROJ_DIR = Path(__file__).parent / "amqpproj"
sys.path.insert(0, str(PROJ_DIR))
import amqp_admin  # noqa: E402

from taskframe.transport.amqp import AMQPTransport  # noqa: E402

pytestmark = pytest.mark.rabbitmq


def _wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Fleet:
    """Worker subprocesses of ``aproj`` and the client app in this process."""

    def __init__(self, tmp_path: Path, broker: str, queues: str, **env: str) -> None:
        self.prefix = f"tfr{uuid.uuid4().hex[:8]}"
        self.record = tmp_path / "record.txt"
        self.env = {
            **os.environ,
            "TASKFRAME_BROKER_URL": broker,
            "APROJ_QUEUES": queues,
            "APROJ_PREFIX": self.prefix,
            "APROJ_RECORD": str(self.record),
            "PYTHONPATH": os.pathsep.join([str(PROJ_DIR), os.environ.get("PYTHONPATH", "")]),
            **env,
        }
        self.env.pop("TASKFRAME_RESULT_BACKEND", None)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        self.tmp_path = tmp_path

    def client(self) -> Any:
        """The ``aproj`` app, imported with this fleet's environment."""
        saved = {k: os.environ.get(k) for k in ("TASKFRAME_BROKER_URL", "APROJ_QUEUES",
                                               "APROJ_PREFIX")}
        os.environ.update({k: self.env[k] for k in saved})
        try:
            sys.modules.pop("aproj", None)
            import aproj
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        return aproj

    def start_worker(self, *args: str) -> subprocess.Popen[bytes]:
        log = self.tmp_path / f"worker{len(self.procs)}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "taskframe", "-A", "aproj", "worker", "-l", "INFO",
             "-n", f"w{len(self.procs)}@%h", *args],
            env=self.env, cwd=PROJ_DIR, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        )
        self.procs.append(proc)
        self.logs.append(log)
        return proc

    def lines(self) -> list[str]:
        return self.record.read_text().splitlines() if self.record.exists() else []

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        mod = sys.modules.pop("aproj", None)
        if mod is not None:
            mod.app.close()

    def log_text(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()}" for p in self.logs if p.exists())


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    url = services.rabbitmq_url()
    queue = f"tfrq-{uuid.uuid4().hex[:10]}"
    f = Fleet(tmp_path, url, f"{queue}:classic")
    yield f
    f.stop()
    admin = AMQPTransport(url, {})
    admin.connect()
    try:
        admin.delete_queue(queue)
        admin.delete_exchange(queue)
    finally:
        admin.close()


@pytest.mark.slow
@pytest.mark.parametrize("pool", [["-P", "solo"], ["-P", "threads", "-c", "4"]],
                         ids=["solo", "threads"])
def test_2000_tasks_survive_a_forced_close_of_the_workers_connection(
    fleet: Fleet, pool: list[str],
) -> None:
    aproj = fleet.client()
    for n in range(2000):
        aproj.record.delay(n, 0.01)  # long enough a run for the close to land mid-way
    aproj.app.close()
    worker = fleet.start_worker(*pool)
    _wait_until(lambda: len(fleet.lines()) >= 300, 120, "the first 300 runs")
    assert amqp_admin.close_connections(fleet.prefix) >= 1
    done_at_close = len(fleet.lines())
    assert done_at_close < 2000, "the close came too late to test anything"
    _wait_until(lambda: len({line.split()[0] for line in fleet.lines()}) >= 2000, 300,
                "2,000 distinct task runs")
    time.sleep(1.0)  # any late duplicate would land now
    lines = [line.split() for line in fleet.lines()]
    runs = collections.Counter(int(n) for n, _pid, _redelivered in lines)
    assert sorted(runs) == list(range(2000)), fleet.log_text()
    # At-least-once is all AMQP promises: a message whose early ack was in flight when the
    # broker closed the link comes back. Every extra run must be such a broker redelivery.
    extra = [n for n, count in runs.items() if count > 1]
    redelivered = {int(n) for n, _pid, flag in lines if flag == "1"}
    print(f"{len(lines)} runs, {done_at_close} before the close, {len(extra)} run twice, "
          f"{len(redelivered)} redelivered")
    assert set(extra) <= redelivered, (extra, sorted(redelivered))
    assert all(runs[n] == 2 for n in extra)
    log = fleet.log_text()
    assert "Connection to broker lost" in log and "Reconnected to" in log, log
    fleet.stop()
    assert worker.returncode == 0, fleet.log_text()


def test_worker_exits_non_zero_when_the_broker_is_unreachable(tmp_path: Path) -> None:
    services.rabbitmq_url()
    fleet = Fleet(tmp_path, "amqp://guest:guest@127.0.0.1:1//", "tfrq-unreachable:classic",
                  APROJ_MAX_RETRIES="1")
    proc = fleet.start_worker("-P", "solo")
    try:
        code = proc.wait(timeout=120)
    finally:
        fleet.stop()
    log = fleet.log_text()
    assert code != 0, log
    assert "Cannot connect to the broker amqp://guest:**@127.0.0.1:1//" in log, log
    assert "Giving up" in log, log


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, timeout=120,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.slow
def test_2000_tasks_survive_a_broker_stop_and_start(fleet: Fleet) -> None:
    """``rabbitmqctl stop_app; start_app`` mid-run: every task completes, the worker says so.

    This cuts every client of the shared broker for a few seconds: CI runs the suite in one
    process, so nothing else is running then.
    """
    aproj = fleet.client()
    for n in range(2000):
        aproj.record.delay(n, 0.005)
    aproj.app.close()
    worker = fleet.start_worker("-P", "threads", "-c", "4")
    _wait_until(lambda: len(fleet.lines()) >= 300, 120, "the first 300 runs")
    try:
        _rabbitmqctl("stop_app")
        done_at_stop = len(fleet.lines())
        time.sleep(2.0)
    finally:
        _rabbitmqctl("start_app")
        _rabbitmqctl("await_startup")
    assert done_at_stop < 2000, "the stop came too late to test anything"
    _wait_until(lambda: len({line.split()[0] for line in fleet.lines()}) >= 2000, 300,
                "2,000 distinct task runs")
    lines = [line.split() for line in fleet.lines()]
    runs = collections.Counter(int(n) for n, _pid, _redelivered in lines)
    assert sorted(runs) == list(range(2000)), fleet.log_text()
    extra = [n for n, count in runs.items() if count > 1]
    redelivered = {int(n) for n, _pid, flag in lines if flag == "1"}
    assert set(extra) <= redelivered, (extra, sorted(redelivered))
    log = fleet.log_text()
    assert "Connection to broker lost" in log and "Reconnected to" in log, log
    fleet.stop()
    assert worker.returncode == 0, fleet.log_text()
