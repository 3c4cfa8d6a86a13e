"""Real taskframe worker processes on Redis: countdowns, late acks, kill -9, a Redis restart.

Workers are subprocesses of ``redisproj/rproj.py`` (the pattern of test_worker_processes.py).
Each test has its own ``global_keyprefix`` on the shared Redis (deleted afterwards); the
restart test runs its own ``redis-server`` on a spare port.
"""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import services
from workers import ProjectImport, WorkerProcs, expect, read_lines, wait_until

PROJ_DIR = Path(__file__).parent / "redisproj"
sys.path.insert(0, str(PROJ_DIR))
from redisserver import RedisServer  # noqa: E402


class Fleet:
    """Workers of ``rproj`` as subprocesses, and ``rproj`` imported here as the client."""

    def __init__(self, tmp_path: Path, broker: str, visibility_timeout: float) -> None:
        self.prefix = f"tfw{uuid.uuid4().hex[:8]}."
        self.broker = broker
        self.record = tmp_path / "record.txt"
        env = {
            "TASKFRAME_BROKER_URL": broker,
            "RPROJ_RECORD": str(self.record),
            "RPROJ_PREFIX": self.prefix,
            "RPROJ_VISIBILITY_TIMEOUT": str(visibility_timeout),
        }
        self.workers = WorkerProcs(PROJ_DIR, "rproj", env, tmp_path)
        self.workers.env.pop("TASKFRAME_RESULT_BACKEND", None)
        self.procs = self.workers.procs
        self.project: ProjectImport | None = ProjectImport(PROJ_DIR, "rproj", env)
        self.module = self.project.module

    def start_worker(self, *args: str) -> subprocess.Popen[bytes]:
        return self.workers.start(*args)

    def lines(self) -> list[str]:
        return read_lines(self.record)

    def stop(self) -> None:
        self.workers.stop()
        if self.project is not None:
            self.project.close()
            self.project = None

    def delete_keys(self) -> None:
        client = redis.Redis.from_url(self.broker)
        keys = list(client.scan_iter(match=f"{self.prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()

    def log_text(self) -> str:
        return self.workers.log_text()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path, services.redis_url(), visibility_timeout=2.0)
    yield fleet
    fleet.stop()
    fleet.delete_keys()


def _runs(lines: list[str], prefix: str = "") -> collections.Counter[int]:
    return collections.Counter(
        int(line.split()[-2]) for line in lines if line.startswith(prefix) and line.split())


@pytest.mark.slow
def test_countdown_beyond_the_visibility_timeout_runs_exactly_once(fleet: Fleet) -> None:
    for _ in range(3):
        fleet.start_worker("-P", "threads", "-c", "2")
    fleet.module.record.apply_async((1,), countdown=10)
    wait_until(lambda: len(fleet.lines()) >= 1, 90, "the countdown task to run")
    time.sleep(6.0)  # three visibility timeouts: a second run would land now
    assert fleet.lines()[0].split()[0] == "1"
    assert len(fleet.lines()) == 1, fleet.log_text()


@pytest.mark.slow
def test_late_ack_task_longer_than_the_visibility_timeout_runs_exactly_once(
    fleet: Fleet,
) -> None:
    for _ in range(3):
        fleet.start_worker("-P", "threads", "-c", "2")
    fleet.module.slow_record.delay(8, 8.0)
    wait_until(lambda: any(line.startswith("end 8") for line in fleet.lines()), 90,
                "the 8 s task to finish")
    time.sleep(4.0)  # two visibility timeouts after the ack
    starts = [line for line in fleet.lines() if line.startswith("start 8")]
    ends = [line for line in fleet.lines() if line.startswith("end 8")]
    assert (len(starts), len(ends)) == (1, 1), fleet.log_text()


@pytest.mark.slow
def test_kill_9_of_a_late_ack_holder_hands_its_tasks_to_another_worker(fleet: Fleet) -> None:
    for n in range(3):
        fleet.module.slow_record.delay(n, 3.0)
    victim = fleet.start_worker("-P", "threads", "-c", "4")
    wait_until(lambda: len([ln for ln in fleet.lines() if ln.startswith("start")]) >= 3, 60,
                "the first worker to start all three tasks")
    expect(victim, exit_codes={-signal.SIGKILL}, why="killed mid-task on purpose")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    fleet.start_worker("-P", "threads", "-c", "4")
    wait_until(lambda: len([ln for ln in fleet.lines() if ln.startswith("end")]) >= 3, 90,
                "the three tasks to finish elsewhere")
    ends = [line.split() for line in fleet.lines() if line.startswith("end")]
    assert sorted(int(e[1]) for e in ends) == [0, 1, 2], fleet.log_text()
    assert all(e[2] != str(victim.pid) for e in ends)


@pytest.mark.slow
def test_redis_restart_with_2000_tasks_in_flight_loses_none(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    fleet = Fleet(tmp_path, server.url, visibility_timeout=5.0)
    try:
        record = fleet.module.record
        for n in range(2000):
            record.delay(n)
        fleet.start_worker("-P", "threads", "-c", "4")
        fleet.start_worker("-P", "threads", "-c", "4")
        wait_until(lambda: len(fleet.lines()) >= 200, 120, "the first 200 runs")
        server.restart()
        wait_until(lambda: len(set(_runs(fleet.lines()))) >= 2000, 300,
                    "every one of the 2,000 tasks to run")
        for n in range(2000, 2100):
            record.delay(n)
        wait_until(lambda: len(set(_runs(fleet.lines()))) >= 2100, 120,
                    "the 100 tasks sent after the restart")
        assert sorted(_runs(fleet.lines())) == list(range(2100)), fleet.log_text()[-5000:]
        fleet.stop()
        assert [p.returncode for p in fleet.procs] == [0, 0], fleet.log_text()[-5000:]
    finally:
        fleet.stop()
        server.stop()
