"""A revoked task never runs: revokes the worker did not hear, and ETAs beyond its memory.

Real worker processes of ``controlproj/ctlproj.py``. A revoke reaches a running worker as a
broadcast only live subscribers get; every revoke is also kept in the result backend,
which the worker reads again after its control link comes back and every
``worker_revoked_sync_interval`` seconds. A revoke also stores REVOKED as the task's
state, which a task with an ETA reads before it runs, after the revoked sets forgot it
(``worker_revoked_expires``, lowered here to seconds).
"""

from __future__ import annotations

import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import services
from workers import ProjectImport, WorkerProcs, read_lines, wait_until

from taskframe import states

sys.path.insert(0, str(Path(__file__).resolve().parent / "redisproj"))
from redisserver import RedisServer

PROJ_DIR = Path(__file__).resolve().parent / "controlproj"
NODE = f"tfrv@{socket.gethostname()}"


class Fleet:
    """One worker of ``ctlproj`` on ``broker``; results (and the revoke store) in the shared
    Redis under a key prefix of this test's own."""

    def __init__(self, broker: str, tmp_path: Path, *, shared: bool = True, **env: str) -> None:
        tag = uuid.uuid4().hex[:8]
        self.broker = broker
        self.shared = shared  # a shared server: delete the broker names afterwards
        self.ns = f"tfrv{tag}"
        self.queue = f"rvq-{tag}"
        self.prefix = f"tfrv-{tag}:"
        self.record = tmp_path / "record.txt"
        self.env = {"CTL_BROKER": broker,
                    "CTL_BACKEND": f"{services.redis_url()}?global_keyprefix={self.prefix}",
                    "CTL_NS": self.ns, "CTL_QUEUE": self.queue,
                    "CTL_RECORD": str(self.record), **env}
        self.workers = WorkerProcs(PROJ_DIR, "ctlproj", self.env, tmp_path)
        self.client = ProjectImport(PROJ_DIR, "ctlproj", self.env)

    @property
    def app(self) -> Any:
        return self.client.module.app

    @property
    def record_task(self) -> Any:
        return self.client.module.record

    def start_worker(self) -> None:
        self.workers.start("-P", "threads", "-c", "2", "-n", NODE)
        log = self.workers.logs[-1]
        wait_until(lambda: log.exists() and " ready" in log.read_text(), 60, "the worker")

    def log(self) -> str:
        return self.workers.log_text()

    def inspect_revoked(self) -> list[str]:
        replies = self.app.control.inspect(destination=[NODE], timeout=5).revoked() or {}
        return list(replies.get(NODE, []))

    def stop(self) -> None:
        """Warm shutdown: the worker must exit 0, no thread may have died."""
        codes = self.workers.stop()
        assert codes == [0] * len(codes), self.log()
        assert "Exception in thread" not in self.log(), self.log()

    def close(self) -> None:
        self.workers.stop()
        self.client.close()
        services.redis_delete_prefix(0, self.prefix)
        if self.shared:
            services.drop_broker_names(self.broker, queues=[self.queue], exchanges=[
                self.queue, f"{self.ns}.pidbox", f"reply.{self.ns}.pidbox"])


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path, extra_args=("--appendonly", "no"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _subscribers(admin: redis.Redis) -> int:
    return int(admin.execute_command("PUBSUB", "NUMPAT"))


def test_a_revoke_sent_while_the_control_link_is_down_is_caught_up(
        tmp_path: Path, private_redis: RedisServer) -> None:
    """The control link is cut from the broker side and kept down while the revoke goes out
    (the broadcast reaches nobody); when the link is back the worker reads the revoke store
    and the task, sent afterwards, does not run."""
    # The timer of the catch-up is out of the way: only the reconnect can bring the revoke.
    fleet = Fleet(private_redis.url, tmp_path, shared=False, CTL_SYNC_INTERVAL="600")
    admin = redis.Redis(port=private_redis.port)
    try:
        fleet.start_worker()
        wait_until(lambda: _subscribers(admin) == 1, 30, "the control link")
        # The broker drops the worker's pidbox subscription and refuses a new one.
        admin.execute_command("ACL", "SETUSER", "default", "-psubscribe")
        admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        wait_until(lambda: "remote control lost the broker" in fleet.log(), 30, "the cut")
        task_id = str(uuid.uuid4())
        assert _subscribers(admin) == 0
        fleet.app.control.revoke(task_id)  # heard by nobody; kept in the result backend
        # (It may have reconnected once already, and had its subscribe refused.)
        refused = fleet.log().count("remote control reconnected")
        admin.execute_command("ACL", "SETUSER", "default", "+psubscribe")
        wait_until(lambda: fleet.log().count("remote control reconnected") > refused, 30,
                   "the link back")
        wait_until(lambda: _subscribers(admin) == 1, 30, "the subscription back")
        wait_until(lambda: task_id in fleet.inspect_revoked(), 30, "the catch-up")

        fleet.record_task.apply_async(("revoked",), task_id=task_id)
        assert fleet.record_task.delay("after").get(timeout=30) == "after"
        wait_until(lambda: fleet.app.AsyncResult(task_id).state == states.REVOKED, 30,
                   "REVOKED to be stored")
        wait_until(lambda: "Discarding revoked task" in fleet.log(), 30, "the discard")
        assert read_lines(fleet.record) == ["after"], fleet.log()
        assert "caught up on 1 revoked task id(s)" in fleet.log()
        fleet.stop()
    finally:
        admin.close()
        fleet.close()


def test_a_revoke_the_worker_never_heard_is_caught_up_within_the_interval(
        tmp_path: Path) -> None:
    """A revoke recorded in the store whose broadcast this worker missed without noticing a
    drop: the timer (``worker_revoked_sync_interval``) brings it."""
    fleet = Fleet(services.redis_url(), tmp_path, CTL_SYNC_INTERVAL="1")
    try:
        fleet.start_worker()
        task_id = str(uuid.uuid4())
        fleet.app.control.remember_revoked([task_id])  # recorded, never broadcast
        wait_until(lambda: task_id in fleet.inspect_revoked(), 30, "the catch-up")
        fleet.record_task.apply_async(("revoked",), task_id=task_id)
        assert fleet.record_task.delay("after").get(timeout=30) == "after"
        wait_until(lambda: fleet.app.AsyncResult(task_id).state == states.REVOKED, 30,
                   "REVOKED to be stored")
        assert read_lines(fleet.record) == ["after"], fleet.log()
        fleet.stop()
    finally:
        fleet.close()


@pytest.mark.parametrize("kind", ["amqp", "redis"])
def test_a_revoked_task_whose_eta_is_beyond_the_revoke_memory_never_runs(
        tmp_path: Path, kind: str) -> None:
    """Revokes are remembered 2 s here (``worker_revoked_expires``), the ETA is 6 s away: when
    the task is due (held by the broker on Redis, by the worker on RabbitMQ's classic
    queues) every revoked set forgot it. It reads its stored REVOKED and does not run, so
    REVOKED is not overwritten by SUCCESS."""
    broker = services.rabbitmq_url() if kind == "amqp" else services.redis_url()
    fleet = Fleet(broker, tmp_path, CTL_REVOKED_EXPIRES="2")
    try:
        fleet.start_worker()
        later = fleet.record_task.apply_async(("eta",), countdown=6)
        later.revoke()
        wait_until(lambda: later.id in fleet.inspect_revoked(), 30, "the revoke")
        assert later.state == states.REVOKED  # stored by the worker that heard it
        ok = fleet.record_task.apply_async(("eta-ok",), countdown=6.5)
        assert ok.get(timeout=60) == "eta-ok"
        wait_until(lambda: f"Discarding revoked task: ctl.record[{later.id}]" in fleet.log(),
                   30, "the discard")
        assert later.id not in fleet.inspect_revoked()  # forgotten: the stored state held
        assert later.state == states.REVOKED
        assert read_lines(fleet.record) == ["eta-ok"], fleet.log()
        fleet.stop()
    finally:
        fleet.close()
