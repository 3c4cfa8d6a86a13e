"""Celery 5.7 and taskframe on one RabbitMQ: tasks, results and delayed tasks, both ways.

Results go to PostgreSQL through both database backends, into tables named for
the test (``database_table_names`` on both sides). The URL names the psycopg 3
driver (``db+postgresql+psycopg://``) because psycopg2, SQLAlchemy's default for
``postgresql://`` and so Celery's, is not installed here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import services
import sqlalchemy as sa
from workers import stop_processes, watch

from taskframe.transport.amqp import AMQPTransport

pytestmark = [pytest.mark.interop, pytest.mark.rabbitmq, pytest.mark.postgres]

PROJ_DIR = Path(__file__).resolve().parent.parent / "integration" / "amqpproj"
ENV_KEYS = ("TASKFRAME_BROKER_URL", "TASKFRAME_RESULT_BACKEND", "APROJ_QUEUES", "APROJ_PREFIX")
N = 500


def _wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Shared:
    """One broker, one result database, a classic and a quorum queue; both frameworks."""

    def __init__(self, tmp_path: Path) -> None:
        services.rabbitmq_url()
        pg = services.postgres_url()
        self.prefix = f"tfi{uuid.uuid4().hex[:8]}_"
        self.classic = f"tfi-classic-{uuid.uuid4().hex[:8]}"
        self.quorum = f"tfi-quorum-{uuid.uuid4().hex[:8]}"
        self.direct = f"tfi-qdirect-{uuid.uuid4().hex[:8]}"  # quorum, direct exchange
        self.db_url = pg.replace("postgresql://", "postgresql+psycopg://")
        self.env = {
            **os.environ,
            "TASKFRAME_BROKER_URL": services.rabbitmq_url(),
            "TASKFRAME_RESULT_BACKEND": "db+" + self.db_url,
            "APROJ_QUEUES": f"{self.classic}:classic,{self.quorum}:quorum-topic,"
                            f"{self.direct}:quorum",
            "APROJ_PREFIX": self.prefix,
            "APROJ_RECORD": str(tmp_path / "record.txt"),
            "PYTHONPATH": os.pathsep.join([str(PROJ_DIR), os.environ.get("PYTHONPATH", "")]),
        }
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        self.modules: dict[str, ModuleType] = {}

    def client(self, name: str) -> ModuleType:
        """``aproj`` (taskframe) or ``cproj`` (Celery), imported with this test's settings."""
        saved = {key: os.environ.get(key) for key in ENV_KEYS}
        os.environ.update({key: self.env[key] for key in ENV_KEYS})
        sys.path.insert(0, str(PROJ_DIR))
        try:
            sys.modules.pop(name, None)
            module = __import__(name)
        finally:
            sys.path.remove(str(PROJ_DIR))
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        self.modules[name] = module
        return module

    def start(self, argv: list[str]) -> None:
        log = self.tmp_path / f"worker{len(self.procs)}.log"
        proc = subprocess.Popen(argv, env=self.env, cwd=PROJ_DIR, stdout=log.open("wb"),
                                stderr=subprocess.STDOUT)
        watch(proc, log)
        self.procs.append(proc)
        self.logs.append(log)
        _wait_until(lambda: " ready" in log.read_text() or proc.poll() is not None, 120,
                    "the worker to be ready")
        assert proc.poll() is None, self.log_text()

    def start_taskframe_worker(self, *args: str) -> None:
        self.start([sys.executable, "-m", "taskframe", "-A", "aproj", "worker", "-l", "INFO",
                    "-P", "threads", "-c", "4", "-n", f"tf{len(self.procs)}@%h", *args])

    def start_celery_worker(self) -> None:
        self.start([sys.executable, "-m", "celery", "-A", "cproj", "worker", "-l", "INFO",
                    "-P", "threads", "-c", "4", "-n", f"cel{len(self.procs)}@%h",
                    "--without-mingle", "--without-gossip", "--without-heartbeat"])

    def log_text(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()}" for p in self.logs if p.exists())

    def stop_workers(self) -> None:
        stop_processes(self.procs)

    def stop(self) -> None:
        self.stop_workers()
        for name, module in self.modules.items():
            module.app.close()
            sys.modules.pop(name, None)
        self._cleanup()

    def _cleanup(self) -> None:
        # The tables first: a leftover breaks every later run (Celery's index names ignore
        # the table prefix), while a broker that is down at teardown must not keep them.
        engine = sa.create_engine(self.db_url)
        try:
            with engine.begin() as conn:
                for table in ("celery_taskmeta", "celery_tasksetmeta"):
                    conn.execute(sa.text(f'DROP TABLE IF EXISTS "{self.prefix}{table}"'))
        finally:
            engine.dispose()
        admin = AMQPTransport(self.env["TASKFRAME_BROKER_URL"], {})
        admin.connect()
        try:
            for name in (self.classic, self.quorum, self.direct):
                admin.delete_queue(name)
                admin.delete_exchange(name)
        finally:
            admin.close()


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[Shared]:
    s = Shared(tmp_path)
    yield s
    s.stop()


@pytest.mark.slow
def test_celery_client_taskframe_worker(shared: Shared) -> None:
    cproj = shared.client("cproj")
    sent = []
    for queue in (shared.classic, shared.quorum):
        for n in range(N):
            sent.append((n, cproj.add.apply_async((n, 1), queue=queue)))
    shared.start_taskframe_worker()
    for n, result in sent:
        value = result.get(timeout=240)
        assert value["sum"] == n + 1 and value["by"] == "taskframe", value
        assert result.state == "SUCCESS"


@pytest.mark.slow
def test_taskframe_client_celery_worker(shared: Shared) -> None:
    aproj = shared.client("aproj")
    sent = []
    for queue in (shared.classic, shared.quorum):
        for n in range(N):
            sent.append((n, aproj.add.apply_async((n, 2), queue=queue)))
    shared.start_celery_worker()
    for n, result in sent:
        value = result.get(timeout=240)
        assert value["sum"] == n + 2 and value["by"] == "celery", value
        assert result.state == "SUCCESS"


@pytest.mark.slow
def test_delayed_tasks_cross_both_ways_through_the_delay_ladder(shared: Shared) -> None:
    shared.start_taskframe_worker()
    shared.start_celery_worker()
    cproj = shared.client("cproj")
    aproj = shared.client("aproj")
    from_celery = [cproj.add.apply_async((n, 10), countdown=3, queue=shared.quorum)
                   for n in range(20)]
    from_taskframe = [aproj.add.apply_async((n, 20), countdown=3, queue=shared.quorum)
                      for n in range(20)]
    by = set()
    for n, result in enumerate(from_celery):
        value = cproj.app.AsyncResult(result.id).get(timeout=120)
        assert value["sum"] == n + 10
        assert value["exchange"].startswith("celery_delayed_"), value
        by.add(value["by"])
    for n, result in enumerate(from_taskframe):
        value = result.get(timeout=120)
        assert value["sum"] == n + 20
        assert value["exchange"].startswith("celery_delayed_"), value
        by.add(value["by"])
    # Both workers consume the queue, so each ran some of the 40 delayed tasks.
    assert by == {"celery", "taskframe"}, shared.log_text()


@pytest.mark.slow
def test_each_worker_alone_runs_the_others_delayed_task(shared: Shared) -> None:
    cproj = shared.client("cproj")
    aproj = shared.client("aproj")
    shared.start_taskframe_worker()
    value = cproj.add.apply_async((1, 2), countdown=2, queue=shared.quorum).get(timeout=120)
    assert value == {"sum": 3, "exchange": value["exchange"], "by": "taskframe"}
    assert value["exchange"].startswith("celery_delayed_")
    shared.stop_workers()
    shared.start_celery_worker()
    value = aproj.add.apply_async((3, 4), countdown=2, queue=shared.quorum).get(timeout=120)
    assert value == {"sum": 7, "exchange": value["exchange"], "by": "celery"}
    assert value["exchange"].startswith("celery_delayed_")


@pytest.mark.slow
def test_taskframe_worker_hands_a_celery_eta_task_to_the_delay_ladder(shared: Shared) -> None:
    # Celery does not delay through the ladder on a direct exchange: it publishes at once
    # with an eta. Our worker, consuming only quorum queues, sends it down the ladder
    # instead of holding it in memory.
    shared.start_taskframe_worker("-Q", shared.direct)
    cproj = shared.client("cproj")
    result = cproj.add.apply_async((5, 6), countdown=5, queue=shared.direct)
    value = result.get(timeout=120)
    assert value["sum"] == 11 and value["by"] == "taskframe"
    assert value["exchange"].startswith("celery_delayed_"), value


@pytest.mark.slow
def test_a_celery_worker_runs_a_message_carrying_failed_deliveries(shared: Shared) -> None:
    """On a classic queue our count rides in a header of a copy: Celery runs it all the same."""
    from taskframe.transport import Queue

    aproj = shared.client("aproj")
    result = aproj.add.apply_async((40, 2), queue=shared.classic)
    transport = AMQPTransport(shared.env["TASKFRAME_BROKER_URL"], {})
    transport.connect()
    try:
        transport.consume([Queue(shared.classic)])
        deadline = time.monotonic() + 30
        messages: list[Any] = []
        while not messages and time.monotonic() < deadline:
            messages = transport.poll(0.5)
        [message] = messages
        message.requeue_failed()  # as our worker does when the child running it died
        messages = []
        while not messages and time.monotonic() < deadline:
            messages = transport.poll(0.5)
        [copy] = messages
        assert copy.delivery_count == 2
        copy.reject(requeue=True)
    finally:
        transport.close()
    shared.start_celery_worker()
    value = result.get(timeout=120)
    assert value["sum"] == 42 and value["by"] == "celery", value
