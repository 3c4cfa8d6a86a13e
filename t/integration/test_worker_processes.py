"""Real worker processes on the SQL transport: exactly once, and kill -9 recovery."""

from __future__ import annotations

import collections
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import sqlalchemy as sa
from services import postgres_url
from workers import ProjectImport, WorkerProcs, expect, read_lines, wait_until

PROJ_DIR = Path(__file__).parent / "workerproj"

# The workers' visibility timeout: a message whose claim lapses (its ack lost, its worker
# stuck) is delivered again this long after it was claimed or last refreshed.
VISIBILITY_TIMEOUT = 3.0


@dataclass
class Fleet:
    """The client (``wproj`` imported here), the workers, and the record file."""

    project: ProjectImport
    workers: WorkerProcs
    record: Path

    @property
    def module(self) -> ModuleType:
        return self.project.module

    def lines(self) -> list[str]:
        return read_lines(self.record)


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
    record = tmp_path / "record.txt"
    env = {
        "TASKFRAME_BROKER_URL": broker,
        "TASKFRAME_RESULT_BACKEND": backend,
        "WPROJ_RECORD": str(record),
        "WPROJ_TABLE_PREFIX": prefix,
        "WPROJ_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT),
    }
    project = ProjectImport(PROJ_DIR, "wproj", env)
    workers = WorkerProcs(PROJ_DIR, "wproj", env, tmp_path)
    yield Fleet(project, workers, record)
    workers.stop()
    project.close()
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
    fleet.workers.start("-P", "threads", "-c", "4")
    fleet.workers.start("-P", "threads", "-c", "4")
    wait_until(lambda: len(fleet.lines()) >= 2000, 240, "2,000 task runs")
    # A message whose ack was lost comes back once its claim lapses, a visibility timeout
    # after the run, and runs again: wait two of them (and a claim-refresh period) before
    # calling it exactly once.
    time.sleep(2 * VISIBILITY_TIMEOUT + 1.0)
    runs = collections.Counter(int(line.split()[0]) for line in fleet.lines())
    assert sorted(runs) == list(range(2000)), fleet.workers.log_text()
    assert set(runs.values()) == {1}, {n: c for n, c in runs.items() if c != 1}
    pids = {line.split()[1] for line in fleet.lines()}
    assert len(pids) == 2, "both workers should have taken part"
    assert fleet.workers.stop() == [0, 0], fleet.workers.log_text()


@pytest.mark.slow
def test_kill_9_of_a_late_ack_holder_hands_the_task_to_another_worker(fleet: Fleet) -> None:
    result = fleet.module.slow_record.delay(7, 2.0)
    victim = fleet.workers.start("-P", "solo")
    wait_until(lambda: any(line.startswith("start 7") for line in fleet.lines()), 60,
               "the first worker to start the task")
    expect(victim, exit_codes={-signal.SIGKILL}, why="killed mid-task on purpose")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    fleet.workers.start("-P", "solo")
    assert result.get(timeout=60) == 7, fleet.workers.log_text()
    starts = [line for line in fleet.lines() if line.startswith("start 7")]
    ends = [line for line in fleet.lines() if line.startswith("end 7")]
    assert len(starts) == 2 and len(ends) == 1
    assert starts[0].split()[2] == str(victim.pid)
    assert ends[0].split()[2] != str(victim.pid)
