"""Real worker processes on the SQL transport: exactly once, and kill -9 recovery."""

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
import sqlalchemy as sa
from services import postgres_url

from taskframe import Taskframe

PROJ_DIR = Path(__file__).parent / "workerproj"


def _wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Fleet:
    """Starts workers of ``wproj`` as subprocesses and the client app in this process."""

    def __init__(self, tmp_path: Path, broker: str, backend: str, prefix: str,
                 visibility_timeout: float = 60.0) -> None:
        self.record = tmp_path / "record.txt"
        self.env = {
            **os.environ,
            "TASKFRAME_BROKER_URL": broker,
            "TASKFRAME_RESULT_BACKEND": backend,
            "WPROJ_RECORD": str(self.record),
            "WPROJ_TABLE_PREFIX": prefix,
            "WPROJ_VISIBILITY_TIMEOUT": str(visibility_timeout),
            "PYTHONPATH": os.pathsep.join([str(PROJ_DIR), os.environ.get("PYTHONPATH", "")]),
        }
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        self.tmp_path = tmp_path
        for key in ("TASKFRAME_BROKER_URL", "TASKFRAME_RESULT_BACKEND"):
            os.environ[key] = self.env[key]
        os.environ["WPROJ_TABLE_PREFIX"] = prefix
        sys.path.insert(0, str(PROJ_DIR))
        import wproj

        self.module = wproj
        self.app: Taskframe = wproj.app
        self.app.conf.broker_transport_options = {"visibility_timeout": visibility_timeout,
                                                  "table_prefix": prefix}

    def start_worker(self, *args: str) -> subprocess.Popen[bytes]:
        log = self.tmp_path / f"worker{len(self.procs)}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "taskframe", "-A", "wproj", "worker", "-l", "INFO",
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
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.app.close()
        if str(PROJ_DIR) in sys.path:
            sys.path.remove(str(PROJ_DIR))
        sys.modules.pop("wproj", None)
        for key in ("TASKFRAME_BROKER_URL", "TASKFRAME_RESULT_BACKEND", "WPROJ_TABLE_PREFIX"):
            os.environ.pop(key, None)

    def log_text(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()}" for p in self.logs if p.exists())


@pytest.fixture(params=["sqlite", "postgresql"])
def fleet(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Fleet]:
    prefix = f"t{uuid.uuid4().hex[:8]}_"
    if request.param == "sqlite":
        db = tmp_path / "broker.sqlite3"
        broker, backend, cleanup_url = f"sqlite:///{db}", f"db+sqlite:///{db}", None
    else:
        url = postgres_url()
        broker, backend = f"sqla+{url}", f"db+{url}"
        cleanup_url = url.replace("postgresql://", "postgresql+psycopg://")
    fleet = Fleet(tmp_path, broker, backend, prefix, visibility_timeout=3.0)
    yield fleet
    fleet.stop()
    if cleanup_url:
        engine = sa.create_engine(cleanup_url)
        meta = sa.MetaData()
        meta.reflect(engine)
        with engine.begin() as conn:
            for table in reversed(meta.sorted_tables):
                if table.name.startswith(prefix):
                    conn.execute(sa.text(f'DROP TABLE IF EXISTS "{table.name}" CASCADE'))
        engine.dispose()


@pytest.mark.slow
def test_two_workers_run_2000_tasks_exactly_once(fleet: Fleet) -> None:
    record = fleet.module.record
    for n in range(2000):
        record.delay(n)
    fleet.start_worker("-P", "threads", "-c", "4")
    fleet.start_worker("-P", "threads", "-c", "4")
    _wait_until(lambda: len(fleet.lines()) >= 2000, 240, "2,000 task runs")
    time.sleep(1.0)  # any duplicate run would land now
    runs = collections.Counter(int(line.split()[0]) for line in fleet.lines())
    assert sorted(runs) == list(range(2000)), fleet.log_text()
    assert set(runs.values()) == {1}, {n: c for n, c in runs.items() if c != 1}
    pids = {line.split()[1] for line in fleet.lines()}
    assert len(pids) == 2, "both workers should have taken part"
    fleet.stop()
    assert [p.returncode for p in fleet.procs] == [0, 0], fleet.log_text()


@pytest.mark.slow
def test_kill_9_of_a_late_ack_holder_hands_the_task_to_another_worker(fleet: Fleet) -> None:
    result = fleet.module.slow_record.delay(7, 2.0)
    victim = fleet.start_worker("-P", "solo")
    _wait_until(lambda: any(line.startswith("start 7") for line in fleet.lines()), 60,
                "the first worker to start the task")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    fleet.start_worker("-P", "solo")
    assert result.get(timeout=60) == 7, fleet.log_text()
    starts = [line for line in fleet.lines() if line.startswith("start 7")]
    ends = [line for line in fleet.lines() if line.startswith("end 7")]
    assert len(starts) == 2 and len(ends) == 1
    assert starts[0].split()[2] == str(victim.pid)
    assert ends[0].split()[2] != str(victim.pid)
