"""A delivery on Redis belongs to the worker, not to its socket: blips, pauses and restarts.

Each test runs its own ``redis-server`` (``RedisServer``: a spare port, append-only with
fsync always) and real worker processes of ``redisproj/rproj.py``, with a visibility
timeout of an hour, so a message the worker failed to give back or to ack would stay
stuck for the whole test: every "ran once" and "all ran" below is decided by the
worker's reconnection, never by the visibility timeout.
"""

from __future__ import annotations

import collections
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from workers import ProjectImport, WorkerProcs, read_lines, wait_until

PROJ_DIR = Path(__file__).parent / "redisproj"
sys.path.insert(0, str(PROJ_DIR))
from redisserver import RedisServer  # noqa: E402

HOUR = 3600.0


class Scene:
    """A private Redis server, workers of ``rproj`` on it and ``rproj`` as the client."""

    def __init__(self, tmp_path: Path, *, socket_timeout: float = 5.0) -> None:
        self.server = RedisServer(tmp_path)
        self.server.start()
        self.record = tmp_path / "record.txt"
        env = {
            "TASKFRAME_BROKER_URL": self.server.url,
            "RPROJ_RECORD": str(self.record),
            "RPROJ_PREFIX": "",
            "RPROJ_VISIBILITY_TIMEOUT": str(HOUR),
            "RPROJ_SOCKET_TIMEOUT": str(socket_timeout),
        }
        self.workers = WorkerProcs(PROJ_DIR, "rproj", env, tmp_path)
        self.workers.env.pop("TASKFRAME_RESULT_BACKEND", None)
        self.project: ProjectImport | None = ProjectImport(PROJ_DIR, "rproj", env)
        self.module = self.project.module

    def admin(self) -> redis.Redis:
        return redis.Redis.from_url(self.server.url, socket_timeout=30)

    def lines(self, kind: str) -> list[list[str]]:
        return [line.split() for line in read_lines(self.record) if line.startswith(kind)]

    def runs(self) -> collections.Counter[int]:
        """How often each ``record(n)`` ran."""
        return collections.Counter(
            int(line.split()[0]) for line in read_lines(self.record)
            if line.split() and line.split()[0].isdigit())

    def held_in_redis(self) -> int:
        with self.admin() as client:
            return int(client.hlen("unacked"))

    def stop(self) -> list[int]:
        codes = self.workers.stop()
        if self.project is not None:
            self.project.close()
            self.project = None
        return codes

    def close(self) -> None:
        self.stop()
        self.server.stop()


@pytest.fixture
def scene(tmp_path: Path) -> Iterator[Scene]:
    scene = Scene(tmp_path)
    yield scene
    scene.close()


@pytest.fixture
def paused_scene(tmp_path: Path) -> Iterator[Scene]:
    scene = Scene(tmp_path, socket_timeout=2.0)
    yield scene
    scene.close()


def _start_four_slow_tasks(scene: Scene, seconds: float) -> None:
    scene.workers.start("-P", "threads", "-c", "4")
    for n in range(4):
        scene.module.slow_record.delay(n, seconds)
    wait_until(lambda: len(scene.lines("start")) >= 4, 60, "the four tasks to start")


def _assert_each_ran_once(scene: Scene) -> None:
    wait_until(lambda: len(scene.lines("end")) >= 4, 90, "the four tasks to end")
    time.sleep(3.0)  # a second run of any of them would start now
    starts = collections.Counter(line[1] for line in scene.lines("start"))
    assert starts == {"0": 1, "1": 1, "2": 1, "3": 1}, scene.workers.log_text()[-5000:]
    wait_until(lambda: scene.held_in_redis() == 0, 30, "the four late acks to reach Redis")
    assert scene.stop() == [0], scene.workers.log_text()[-5000:]


@pytest.mark.slow
def test_a_blip_does_not_give_back_the_messages_of_running_tasks(scene: Scene) -> None:
    """The server drops the worker's connections and answers again at once: the four
    running acks_late tasks keep their claims (before, the reconnect gave their messages
    back and the worker ran each again beside the first run)."""
    _start_four_slow_tasks(scene, 6.0)
    with scene.admin() as client:
        assert client.client_kill_filter(_type="normal", skipme=True) >= 1
    _assert_each_ran_once(scene)
    assert "Reconnected to" in scene.workers.log_text()


@pytest.mark.slow
def test_a_pause_longer_than_the_socket_timeout_runs_each_task_once(
    paused_scene: Scene,
) -> None:
    """``CLIENT PAUSE`` for 4.5 s with a 2 s socket timeout: the worker's link times out,
    and the server answers again while the worker reconnects."""
    scene = paused_scene
    _start_four_slow_tasks(scene, 8.0)
    with scene.admin() as client:
        client.execute_command("CLIENT", "PAUSE", 4500, "ALL")
    wait_until(lambda: "Connection to broker lost" in scene.workers.log_text(), 30,
               "the worker to see its link time out")
    _assert_each_ran_once(scene)


@pytest.mark.slow
def test_a_restart_gives_back_held_messages_and_writes_late_acks(scene: Scene) -> None:
    """Redis stops for 2 s under a draining worker and comes back (its append-only file
    keeps the ``unacked`` hash). Messages the worker held and had not started go back to
    their queue as soon as Redis answers, acks that could not be written are written
    then, and the tasks running across the restart end once: all 300 run, none twice, and
    nothing is left held (before: "could not give back N held message(s)": stuck for the
    visibility timeout, an hour here)."""
    record = scene.module.record
    for n in range(300):
        record.delay(n)
    for n in range(4):
        scene.module.slow_record.delay(1000 + n, 3.0)
    scene.workers.start("-P", "threads", "-c", "4", "--prefetch-multiplier", "8")
    wait_until(lambda: len(scene.runs()) >= 20, 60, "the first runs")
    scene.server.stop()
    time.sleep(2.0)
    scene.server.start()
    wait_until(lambda: len(scene.runs()) >= 300, 90, "every one of the 300 tasks to run")
    wait_until(lambda: len(scene.lines("end")) >= 4, 60, "the four slow tasks to end")
    assert sorted(scene.runs().values()) == [1] * 300, scene.workers.log_text()[-5000:]
    starts = collections.Counter(line[1] for line in scene.lines("start"))
    assert set(starts.values()) == {1}, scene.workers.log_text()[-5000:]
    wait_until(lambda: scene.held_in_redis() == 0, 30, "every ack to reach Redis")
    assert scene.stop() == [0], scene.workers.log_text()[-5000:]




@pytest.mark.slow
def test_a_slow_result_store_does_not_stall_the_consumer_loop(tmp_path: Path) -> None:
    """An expired message is stored REVOKED before it is acked; the store (its own Redis
    here) is asleep for 4 s when it comes. The loop hands the write to its store thread
    and goes on: the 20 tasks behind it (results ignored) run while the store still
    sleeps (before, the loop waited in the write: no poll, no heartbeat, no claim
    refresh), and the expired task ends REVOKED and acked once the store wakes."""
    (tmp_path / "store").mkdir()
    store = RedisServer(tmp_path / "store", extra_args=("--enable-debug-command", "yes"))
    store.start()
    scene = Scene(tmp_path)
    scene.workers.env["TASKFRAME_RESULT_BACKEND"] = store.url
    admin = redis.Redis.from_url(store.url, socket_timeout=30)
    try:
        scene.workers.start("-P", "threads", "-c", "2")
        module = scene.module
        module.app.conf.result_backend = store.url
        module.record.delay(10_000)
        wait_until(lambda: scene.runs().get(10_000) == 1, 60, "the worker to be ready")
        sleeper = threading.Thread(target=admin.execute_command, args=("DEBUG", "SLEEP", 4))
        sleeper.start()
        past = datetime.now(UTC) - timedelta(seconds=1)
        expired = module.plain.apply_async((999,), expires=past)
        for n in range(20):
            module.record.delay(n)
        wait_until(lambda: all(scene.runs().get(n) == 1 for n in range(20)) or
                   not sleeper.is_alive(), 30, "the 20 tasks or the store's wake-up")
        ran_while_asleep = sleeper.is_alive()
        sleeper.join()
        assert ran_while_asleep, scene.workers.log_text()[-3000:]
        assert expired.get(timeout=30, propagate=False) is not None
        assert expired.state == "REVOKED"
        assert 999 not in scene.runs()
        wait_until(lambda: scene.held_in_redis() == 0, 30, "the expired message's ack")
        assert scene.stop() == [0], scene.workers.log_text()[-5000:]
    finally:
        admin.close()
        scene.close()
        store.stop()


@pytest.mark.slow
def test_the_watchdog_leaves_a_reconnecting_worker_alone(scene: Scene) -> None:
    """Redis is down for longer than the health timeout: the worker is reconnecting, which
    is what it should do, not a wedge, so ``--watchdog`` does not make it exit (a restart
    would lose what the worker holds and could not connect either); once Redis is back
    the worker runs the tasks sent meanwhile and exits 0."""
    proc = scene.workers.start("-P", "threads", "-c", "2", "--health-timeout", "2",
                               "--watchdog")
    scene.module.record.delay(1)
    wait_until(lambda: scene.runs().get(1) == 1, 60, "the first task")
    scene.server.stop()
    time.sleep(7.0)  # three health timeouts and more
    assert proc.poll() is None, scene.workers.log_text()[-3000:]
    scene.server.start()
    scene.module.record.delay(2)
    wait_until(lambda: scene.runs().get(2) == 1, 60, "the task sent after the outage")
    assert scene.stop() == [0], scene.workers.log_text()[-5000:]
