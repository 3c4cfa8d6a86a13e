"""The prefork pool's fork servers and its shutdown, in real ``taskframe worker`` processes.

- Every fork server, the first and any replacement, is forked from a process that runs one
  thread: a lock another thread held at that instant would stay held in every child. The
  project's worker holds a lock from ``worker_ready`` on (``PFPROJ_HOLD_LOCK``); the
  ``lineage`` task reports, from a child, whether it can take it and how many threads the
  process that forked its server ran.
- A SIGTERM to the worker's whole process group (``kill -- -PGID``, GNU ``timeout``,
  supervisord's ``stopasgroup``) is a warm shutdown of the worker: it reaches the worker, not
  its children, so running tasks finish and no child is reported lost.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType

import pytest
import services
from workers import ProjectImport, WorkerProcs, wait_until

from taskframe.errors import WorkerLostError

PROJ_DIR = Path(__file__).parent / "preforkproj"


class Fleet:
    """The client (``pfproj`` imported here), the worker processes, the record file."""

    def __init__(self, tmp_path: Path, env: Mapping[str, str] | None = None) -> None:
        db = tmp_path / "broker.sqlite3"
        self.record = tmp_path / "record.txt"
        self.env = {"TASKFRAME_BROKER_URL": f"sqlite:///{db}",
                    "TASKFRAME_RESULT_BACKEND": f"db+sqlite:///{db}",
                    "PFPROJ_RECORD": str(self.record), **(env or {})}
        self.project = ProjectImport(PROJ_DIR, "pfproj", self.env)
        self.workers = WorkerProcs(PROJ_DIR, "pfproj", self.env, tmp_path)

    @property
    def mod(self) -> ModuleType:
        return self.project.module

    def ready(self) -> None:
        assert self.mod.add.delay(1, 1).get(timeout=30) == 2, self.workers.log_text()

    def close(self) -> list[int]:
        try:
            return self.workers.stop()
        finally:
            self.project.close()


@pytest.fixture
def rabbit_fleet(tmp_path: Path) -> Iterator[Fleet]:
    """On RabbitMQ, where the worker sends events (their threads start at worker start)."""
    url = services.rabbitmq_url()
    queue = f"tf-pfservers-{uuid.uuid4().hex[:10]}"
    fleet = Fleet(tmp_path, {"TASKFRAME_BROKER_URL": url, "PFPROJ_QUEUE": queue,
                             "PFPROJ_HOLD_LOCK": "1"})
    try:
        yield fleet
    finally:
        fleet.close()
        services.drop_broker_names(url, queues=[queue])


def children_of(pid: int) -> list[int]:
    """The live processes whose parent is ``pid`` (from ``/proc``)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if fields[0] != "Z" and int(fields[1]) == pid:  # state, ppid
            found.append(int(entry))
    return found


def test_a_killed_fork_server_is_replaced_from_a_single_thread(rabbit_fleet: Fleet) -> None:
    fleet = rabbit_fleet
    # One task per child: every run after the kill is in a child of the replacement.
    proc = fleet.workers.start("-P", "prefork", "-c", "1", "--max-tasks-per-child", "1")
    fleet.ready()
    first = fleet.mod.lineage.delay().get(timeout=30)
    log = fleet.workers.log_text
    # The first server: forked at pool start, before the worker's event threads ran.
    assert first["threads"] == 1, log()
    assert first["lock_free"] is True
    assert children_of(proc.pid) == [first["server"]], "the worker's one child is its server"

    # Its children: the spare, and the pool's next child (already forked, maybe).
    forked_by_first = children_of(first["server"])
    os.kill(first["server"], signal.SIGKILL)
    runs = [fleet.mod.lineage.delay().get(timeout=30) for _ in range(4)]
    runs = [run for run in runs if run["pid"] not in forked_by_first]  # an orphan's, maybe
    assert len(runs) >= 3, runs
    # The replacement was not forked from the running worker (its consumer, supervisor,
    # events and remote-control threads): the lock the worker holds is free in its children.
    assert all(run["lock_free"] is True for run in runs), runs
    assert all(run["threads"] == 1 for run in runs), runs
    servers = {run["server"] for run in runs}
    assert len(servers) == 1, runs  # one replacement: the spare the killed server forked
    assert servers <= set(forked_by_first), (runs, forked_by_first)
    assert [fleet.mod.add.delay(n, n).get(timeout=30) for n in range(4)] == [0, 2, 4, 6]

    assert fleet.workers.stop() == [0], log()
    text = log()
    assert f"fork server (pid {first['server']}) died" in text, text
    assert "forked while" not in text, text  # no fork server came from a busy process
    assert "Traceback" not in text, text


def test_a_sigterm_to_the_worker_group_is_a_warm_shutdown(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    try:
        proc = fleet.workers.start("-P", "prefork", "-c", "2", new_session=True)
        fleet.ready()
        assert [fleet.mod.add.delay(n, 1).get(timeout=30) for n in range(6)] == list(range(1, 7))
        # A child that really dies holding a job is still reported (here: SIGTERM to it).
        lost = fleet.mod.blocker.delay(1, 60)
        wait_until(lambda: fleet.mod.starts(1), 30, "the first blocker to start")
        os.kill(fleet.mod.starts(1)[0], signal.SIGTERM)
        exc = lost.get(timeout=30, propagate=False)
        assert isinstance(exc, WorkerLostError), exc
        assert "signal 15 (SIGTERM)" in str(exc)

        running = fleet.mod.blocker.delay(2, 3)
        wait_until(lambda: fleet.mod.starts(2), 30, "the second blocker to start")
        os.killpg(proc.pid, signal.SIGTERM)  # the group: worker, fork server, children
        assert running.get(timeout=30) == 2, fleet.workers.log_text()  # it finished
        assert proc.wait(timeout=30) == 0, fleet.workers.log_text()
    finally:
        fleet.close()
    text = fleet.workers.log_text()
    after = text.split("SIGTERM received", 1)[1]
    for line in ("WorkerLostError", "exited prematurely", "exited with", "ERROR"):
        assert line not in after, text


def test_a_warm_shutdown_after_the_tasks_reports_no_child_lost(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    try:
        proc = fleet.workers.start("-P", "prefork", "-c", "2")
        fleet.ready()
        assert [fleet.mod.add.delay(n, 1).get(timeout=30) for n in range(6)] == list(range(1, 7))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, fleet.workers.log_text()
    finally:
        fleet.close()
    text = fleet.workers.log_text()
    for line in ("WorkerLostError", "exited prematurely", "exited with", "ERROR"):
        assert line not in text, text
    assert not children_of(proc.pid)


def test_no_child_is_left_when_the_worker_is_killed(tmp_path: Path) -> None:
    """The fork servers and idle children leave with a worker killed outright, though a
    signal to its process group no longer reaches them."""
    fleet = Fleet(tmp_path)
    try:
        proc = fleet.workers.start("-P", "prefork", "-c", "2", exit_codes={-signal.SIGKILL},
                                   why="this test kills the worker")
        fleet.ready()
        pids = {fleet.mod.pid.delay().get(timeout=30) for _ in range(4)}
        pids.update(children_of(proc.pid))  # the fork server
        proc.kill()
        proc.wait(timeout=30)
        wait_until(lambda: not any(Path(f"/proc/{p}").exists() for p in pids), 30,
                   "the children to exit")
    finally:
        fleet.close()



def test_a_server_killed_with_its_spare_leaves_the_children_it_has(rabbit_fleet: Fleet) -> None:
    """No process is left to fork from safely: the pool says so, forks no more, and its
    children (still connected to the worker) go on running tasks."""
    fleet = rabbit_fleet
    proc = fleet.workers.start("-P", "prefork", "-c", "1")
    fleet.ready()
    child = fleet.mod.pid.delay().get(timeout=30)
    (server,) = children_of(proc.pid)
    wait_until(lambda: len(children_of(server)) == 2, 30, "the spare")
    (spare,) = set(children_of(server)) - {child}
    os.kill(spare, signal.SIGSTOP)  # it cannot fork a spare of its own meanwhile
    os.kill(server, signal.SIGKILL)
    os.kill(spare, signal.SIGKILL)
    assert [fleet.mod.pid.delay().get(timeout=30) for _ in range(3)] == [child] * 3
    wait_until(lambda: "so did its spare" in fleet.workers.log_text(), 30, "the critical line")
    assert fleet.workers.stop() == [0], fleet.workers.log_text()
    assert "Traceback" not in fleet.workers.log_text()


def test_a_killed_spare_is_forked_again_by_its_server(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, {"PFPROJ_HOLD_LOCK": "1"})
    try:
        proc = fleet.workers.start("-P", "prefork", "-c", "1")
        fleet.ready()
        child = fleet.mod.pid.delay().get(timeout=30)
        (server,) = children_of(proc.pid)
        wait_until(lambda: len(children_of(server)) == 2, 30, "the spare")
        (spare,) = set(children_of(server)) - {child}
        os.kill(spare, signal.SIGKILL)
        wait_until(lambda: set(children_of(server)) - {child, spare}, 30, "a new spare")
        (again,) = set(children_of(server)) - {child, spare}
        os.kill(server, signal.SIGKILL)  # the new spare takes over ...
        os.kill(child, signal.SIGKILL)  # ... and forks the child that replaces this one
        run = fleet.mod.lineage.delay().get(timeout=30)
        assert (run["server"], run["threads"], run["lock_free"]) == (again, 1, True), run
        assert fleet.workers.stop() == [0], fleet.workers.log_text()
    finally:
        fleet.close()
    text = fleet.workers.log_text()
    assert f"spare prefork fork server (pid {spare}) exited" in text, text
    assert f"its spare (pid {again}) takes over" in text, text
