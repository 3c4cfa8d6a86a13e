"""Wedge detection on real worker processes: a wedged pool is reported by the health endpoint
and ``inspect stats``, and with ``--watchdog`` the worker exits 75; a busy one is neither.

The wedges are real: an ``async def`` task that blocks the asyncio pool's event loop with a
synchronous sleep, and a prefork pool whose fork server is stopped (SIGSTOP) so that a
recycled child is never replaced. Workers run on the shared Redis under a key prefix of
their own, with ``--health-timeout 2`` (``1.5`` for the busy ones: their tasks run four times
that long).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import services
from workers import ProjectImport, WorkerProcs, read_lines, wait_until

pytestmark = pytest.mark.redis

PROJ_DIR = Path(__file__).parent / "wedgeproj"
EX_WEDGED = 75


class Fleet:
    """``wedgeproj`` workers on the shared Redis, and the project imported here as client."""

    def __init__(self, tmp_path: Path) -> None:
        self.prefix = f"tfwedge{uuid.uuid4().hex[:8]}."
        self.record = tmp_path / "record.txt"
        env = {"WEDGEPROJ_BROKER": services.redis_url(), "WEDGEPROJ_PREFIX": self.prefix,
               "WEDGEPROJ_RECORD": str(self.record)}
        self.workers = WorkerProcs(PROJ_DIR, "wedgeproj", env, tmp_path)
        for name in ("TASKFRAME_BROKER_URL", "TASKFRAME_RESULT_BACKEND"):
            self.workers.env.pop(name, None)
        self.project = ProjectImport(PROJ_DIR, "wedgeproj", env)

    @property
    def module(self) -> ModuleType:
        return self.project.module

    def start(self, *args: str, **expected: Any) -> subprocess.Popen[bytes]:
        """A worker with a health port; wait until it is ready."""
        proc = self.workers.start("--health-port", "0", *args, **expected)
        log = self.workers.logs[-1]

        def ready() -> bool:
            assert proc.poll() is None, self.workers.log_text()
            return " ready." in log.read_text()

        wait_until(ready, 60, "the worker to be ready")
        return proc

    def health(self, n: int = 0) -> tuple[int, dict[str, Any]]:
        """The health endpoint's status code and body, for worker ``n``."""
        found = re.search(r"health: serving on \S+:(\d+)", self.workers.logs[n].read_text())
        assert found is not None, self.workers.log_text()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{found[1]}/", timeout=5) as resp:
                return int(resp.status), json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def inspect_health(self, n: int = 0) -> dict[str, Any]:
        """``inspect stats``'s ``health`` for worker ``n``."""
        node = f"w{n}@{socket.gethostname()}"
        replies = self.module.app.control.inspect(destination=[node], timeout=5).stats()
        assert replies and node in replies, replies
        health: dict[str, Any] = replies[node]["health"]
        return health

    def lines(self) -> list[str]:
        return read_lines(self.record)

    def close(self) -> None:
        self.workers.stop()
        self.project.close()
        services.redis_delete_prefix(0, self.prefix)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path)
    yield fleet
    fleet.close()


def _stalled(fleet: Fleet, kind: str) -> bool:
    status, body = fleet.health()
    return status == 503 and body["stall"] is not None and body["stall"]["kind"] == kind


def _children(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
    return found


# -- wedged pools are reported -------------------------------------------------------------


def test_a_blocked_asyncio_loop_is_reported_then_recovers(fleet: Fleet) -> None:
    """The loop is blocked for 15 s: the second job waits with a slot free; when the block
    ends the job runs and the worker is healthy again (no watchdog: it goes on)."""
    proc = fleet.start("-P", "asyncio", "-c", "2", "--health-timeout", "2")
    assert fleet.health()[0] == 200
    fleet.module.block.delay(1, 15.0)
    wait_until(lambda: "start 1" in fleet.lines(), 30, "the blocking task to start")
    fleet.module.anap.delay(2, 0.1)
    wait_until(lambda: _stalled(fleet, "pool"), 12, "the health check to report the pool")
    stall = fleet.health()[1]["stall"]
    assert "1 job(s) wait in the asyncio pool with 1 slot(s) free" in stall["detail"], stall
    reported = fleet.inspect_health()
    assert reported["status"] == "stalled" and reported["stall"]["kind"] == "pool", reported
    assert "start 2" not in fleet.lines()
    wait_until(lambda: "end 2" in fleet.lines(), 30, "the waiting job to run after the block")
    wait_until(lambda: fleet.health()[0] == 200, 10, "the health check to recover")
    assert fleet.inspect_health()["status"] == "ok"
    assert proc.poll() is None
    log = fleet.workers.log_text()
    assert "worker stalled (pool)" in log and "worker progresses again" in log, log


def test_a_prefork_pool_whose_fork_server_is_stopped_is_reported(fleet: Fleet) -> None:
    """-c 1 and one task per child: the child exits after its task and the stopped fork
    server never forks its replacement, so the next task waits with the slot free."""
    proc = fleet.start("-P", "prefork", "-c", "1", "--max-tasks-per-child", "1",
                       "--health-timeout", "2")
    servers = _children(proc.pid)
    assert len(servers) == 1, servers  # the fork server; the children are its own
    os.kill(servers[0], signal.SIGSTOP)
    try:
        fleet.module.nap.delay(1, 0.1)
        wait_until(lambda: "end 1" in fleet.lines(), 30, "the first task")
        fleet.module.nap.delay(2, 0.1)
        wait_until(lambda: _stalled(fleet, "pool"), 12, "the health check to report the pool")
        assert fleet.inspect_health()["stall"]["kind"] == "pool"
        assert "start 2" not in fleet.lines()
    finally:
        os.kill(servers[0], signal.SIGCONT)
    wait_until(lambda: "end 2" in fleet.lines(), 30, "the task once a child is forked")
    wait_until(lambda: fleet.health()[0] == 200, 10, "the health check to recover")


# -- the watchdog ends a wedged worker -----------------------------------------------------


def test_watchdog_exits_75_when_a_time_limit_is_not_enforced(fleet: Fleet) -> None:
    """-P asyncio -c 1: the task's 1 s hard limit is a timer on the loop it blocks, so it
    runs on: 2 s past the limit the watchdog ends the worker (cold shutdown, exit 75)."""
    proc = fleet.start("-P", "asyncio", "-c", "1", "--health-timeout", "2", "--watchdog",
                       exit_codes={EX_WEDGED}, why="the watchdog ends the wedged worker")
    fleet.module.block_limited.delay(1, 60.0)
    code = proc.wait(timeout=60)
    log = fleet.workers.log_text()
    assert code == EX_WEDGED, log
    assert re.search(r"CRITICAL/MainProcess\] watchdog: wedgeproj.block_limited\[\S+\] has "
                     r"run \d+ s past its hard time limit \(1 s\): the asyncio pool did not "
                     r"stop it. Exiting with code 75", log), log
    assert "end 1" not in fleet.lines()


def test_watchdog_exits_75_on_a_stopped_fork_server_and_the_task_runs_elsewhere(
        fleet: Fleet) -> None:
    proc = fleet.start("-P", "prefork", "-c", "1", "--max-tasks-per-child", "1",
                       "--health-timeout", "2", "--watchdog",
                       exit_codes={EX_WEDGED}, why="the watchdog ends the wedged worker")
    server = _children(proc.pid)[0]
    os.kill(server, signal.SIGSTOP)
    try:
        fleet.module.nap.delay(1, 0.1)
        wait_until(lambda: "end 1" in fleet.lines(), 30, "the first task")
        fleet.module.nap.delay(2, 0.1)
        code = proc.wait(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server, signal.SIGKILL)  # reaped by the worker, or orphaned if it hung
    log = fleet.workers.log_text()
    assert code == EX_WEDGED, log
    assert "watchdog: 1 job(s) wait in the prefork pool with 1 slot(s) free" in log, log
    assert "start 2" not in fleet.lines()
    # The cold shutdown gave the waiting message back: a new worker runs it.
    fleet.start("-P", "threads", "-c", "1")
    wait_until(lambda: "end 2" in fleet.lines(), 30, "the given-back task on a new worker")


def test_watchdog_exits_75_within_its_grace_when_the_shutdown_hangs(fleet: Fleet) -> None:
    """The consumer loop itself is stuck (a hook sleeps in it for 120 s): the cold shutdown
    the watchdog asks for cannot run there, so the watchdog ends the process itself."""
    proc = fleet.start("-P", "threads", "-c", "1", "--health-timeout", "2", "--watchdog",
                       exit_codes={EX_WEDGED}, why="the watchdog ends the wedged worker")
    fleet.module.stall_loop.delay(120.0)
    wait_until(lambda: "stalling" in fleet.lines(), 30, "the loop to stall")
    code = proc.wait(timeout=60)  # 2 s to see it, then at most EXIT_GRACE (15 s)
    log = fleet.workers.log_text()
    assert code == EX_WEDGED, log
    assert "watchdog: the consumer loop has not turned for" in log, log
    assert "watchdog: the shutdown did not end within 15 s: exiting now" in log, log


# -- a busy pool is not wedged -------------------------------------------------------------


@pytest.mark.parametrize(("pool", "task"), [("solo", "nap_limited"), ("threads", "nap_limited"),
                                            ("prefork", "nap"), ("asyncio", "anap")])
def test_a_long_task_with_work_queued_behind_it_is_not_a_stall(
        fleet: Fleet, pool: str, task: str) -> None:
    """A 6 s task (four health timeouts) holds the only slot while another waits behind it;
    on solo and threads it even runs past a hard time limit they cannot enforce. The
    watchdog is on: the worker must still be running, healthy throughout, and exit 0."""
    proc = fleet.start("-P", pool, "-c", "1", "--health-timeout", "1.5", "--watchdog")
    getattr(fleet.module, task).delay(1, 6.0)
    getattr(fleet.module, "anap" if pool == "asyncio" else "nap").delay(2, 0.1)
    wait_until(lambda: "start 1" in fleet.lines(), 30, "the long task to start")
    seen = []
    deadline = time.monotonic() + 60
    while "end 2" not in fleet.lines() and time.monotonic() < deadline:
        seen.append(fleet.health())
        time.sleep(0.2)
    assert "end 2" in fleet.lines(), fleet.workers.log_text()
    assert len(seen) >= 15 and all(status == 200 for status, _ in seen), seen
    reported = fleet.inspect_health()
    assert reported["status"] == "ok" and reported["stall"] is None, reported
    assert proc.poll() is None, fleet.workers.log_text()
    assert "stalled" not in fleet.workers.log_text()
