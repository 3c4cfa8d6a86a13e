"""Remote control across frameworks: Celery 5.7's CLI and taskframe's, on RabbitMQ and Redis.

One taskframe worker (``tf@host``, queue ``<q>-tf``) and one Celery worker (``cel@host``, queue
``<q>``) share a broker and a ``control_exchange`` named for the test (so workers of other
tests never answer). ``celery inspect ping`` and ``celery control revoke`` reach the taskframe
worker, ``taskframe inspect ping`` reaches the Celery worker, and the Celery worker's start-up
``hello`` (mingle) is answered by the taskframe worker.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import services
from workers import ProjectImport, WorkerProcs, expect, read_lines, wait_until

pytestmark = [pytest.mark.interop, pytest.mark.redis, pytest.mark.rabbitmq]

PROJ_DIR = Path(__file__).resolve().parent.parent / "integration" / "controlproj"
HOST = socket.gethostname()
TF, CEL = f"tf@{HOST}", f"cel@{HOST}"


class Fleet:
    """The two workers, the environment, and the command lines of both frameworks."""

    def __init__(self, broker: str, tmp_path: Path) -> None:
        tag = uuid.uuid4().hex[:8]
        self.broker = broker
        self.ns = f"tfctl{tag}"
        self.queue = f"ctlq-{tag}"
        self.record = tmp_path / "record.txt"
        backend = services.redis_url()
        self.env = {"CTL_BROKER": broker, "CTL_BACKEND": backend, "CTL_NS": self.ns,
                    "CTL_QUEUE": self.queue, "CTL_RECORD": str(self.record)}
        (tmp_path / "tf").mkdir()
        (tmp_path / "cel").mkdir()
        self.tf = WorkerProcs(PROJ_DIR, "ctlproj", self.env, tmp_path / "tf")
        self.cel = WorkerProcs(PROJ_DIR, "cctlproj", self.env, tmp_path / "cel", command=[
            sys.executable, "-m", "celery", "-A", "cctlproj", "worker"])
        self.run_env = {**self.tf.env}
        self.cwd = tmp_path

    def start(self) -> None:
        self.tf.start("-P", "threads", "-c", "2", "-Q", f"{self.queue}-tf", "-n", TF)
        wait_until(lambda: " ready" in self.tf.log_text(), 60, "the taskframe worker")
        self.cel.start("-P", "solo", "-n", CEL, "--without-gossip", "--without-heartbeat")
        wait_until(lambda: " ready." in self.cel.log_text(), 60, "the Celery worker")

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, env=self.run_env, cwd=self.cwd, capture_output=True,
                              text=True, timeout=60)

    def celery(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(sys.executable, "-m", "celery", "-A", "cctlproj", *args)

    def taskframe(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(sys.executable, "-m", "taskframe", "-A", "ctlproj", *args)

    def stop(self) -> None:
        self.tf.stop()
        # Celery's shutdown on RabbitMQ takes ~10 s here (warm or cold): kill it, its
        # queues go with its connection.
        for proc in self.cel.procs:
            expect(proc, exit_codes={-signal.SIGKILL}, why="killed: a warm stop is slow here")
            proc.kill()
            proc.wait()
        queues = [self.queue, f"{self.queue}-tf"]
        services.drop_broker_names(self.broker, queues=queues, exchanges=[
            *queues, f"{self.ns}.pidbox", f"reply.{self.ns}.pidbox"])


@pytest.fixture(params=["amqp", "redis"])
def fleet(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Fleet]:
    broker = services.rabbitmq_url() if request.param == "amqp" else services.redis_url()
    fleet = Fleet(broker, tmp_path)
    try:
        fleet.start()
        yield fleet
    finally:
        fleet.stop()


def test_celery_and_taskframe_tools_reach_each_others_workers(fleet: Fleet) -> None:
    # celery inspect ping -> taskframe worker
    out = fleet.celery("inspect", "ping", "-d", TF, "--timeout", "10")
    assert out.returncode == 0, out.stdout + out.stderr
    assert TF in out.stdout and "pong" in out.stdout

    # taskframe inspect ping -> Celery worker
    out = fleet.taskframe("inspect", "ping", "-d", CEL, "--timeout", "10", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout) == {CEL: {"ok": "pong"}}

    # celery inspect stats/active_queues parse taskframe's replies
    out = fleet.celery("inspect", "stats", "-d", TF, "--timeout", "10", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    stats = json.loads(out.stdout)[TF]
    assert stats["pool"]["max-concurrency"] == 2 and "broker" in stats and "total" in stats

    # celery control revoke -> taskframe worker: the task is skipped, a later one runs
    revoked_id = str(uuid.uuid4())
    out = fleet.celery("control", "revoke", revoked_id, "-d", TF, "--timeout", "10")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "flagged as revoked" in out.stdout
    client = ProjectImport(PROJ_DIR, "ctlproj", fleet.env)
    try:
        record = client.module.record
        record.apply_async(("revoked",), task_id=revoked_id, queue=f"{fleet.queue}-tf")
        last = record.apply_async(("after",), queue=f"{fleet.queue}-tf")
        assert last.get(timeout=30) == "after"
        assert client.module.app.AsyncResult(revoked_id).state == "REVOKED"
    finally:
        client.close()
    assert read_lines(fleet.record) == ["after"], fleet.tf.log_text()

    # the Celery worker's mingle hello was answered without an error on its side
    assert "mingle: sync complete" in fleet.cel.log_text(), fleet.cel.log_text()
