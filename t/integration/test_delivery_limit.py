"""Poison messages: a message whose runs keep killing their process stops after the limit.

Real workers on real brokers (Redis, SQLite, PostgreSQL, RabbitMQ quorum and classic
queues), the project ``t/integration/poisonproj/poproj.py`` with ``worker_delivery_limit``
set low. Every run of a task appends ``start <n> <pid>`` to a record file, so the tests
count runs across worker processes and prefork children:

* a task that kills its own prefork child (acks_late + reject_on_worker_lost) runs exactly
  ``limit`` times; then its FAILURE (``DeliveryLimitExceeded``) is stored, the message waits
  in ``<queue>.dead`` and the worker goes on running other tasks;
* a worker killed (kill -9) while it holds an acks_late message, ``limit`` times (short
  visibility timeouts on Redis and SQL), ends the same way;
* a message given back by warm shutdowns many more times than the limit (a reserved one,
  and a running one through its own ``Reject(requeue=True)``) is not stopped: it runs.

Each broker keeps its names apart: a global key prefix on Redis, a table prefix on
PostgreSQL, a file on SQLite, unique queue names on RabbitMQ (deleted afterwards).
"""

from __future__ import annotations

import json
import signal
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import services
import sqlalchemy as sa
from workers import ProjectImport, WorkerProcs, expect, wait_until

from taskframe import states
from taskframe.errors import DeliveryLimitExceeded
from taskframe.transport import Transport
from taskframe.transport.connection import transport_class

pytestmark = pytest.mark.slow

PROJ_DIR = Path(__file__).parent / "poisonproj"
LIMIT = 3
VISIBILITY_TIMEOUT = 2.0


@dataclass
class Setup:
    """One broker: its URL, transport options and queue type, and how to clean it."""

    kind: str
    broker: str
    options: dict[str, Any]
    queue_type: str = "classic"
    prefix: str = ""
    cleanup: list[Any] = field(default_factory=list)


def _setup(kind: str, tmp_path: Path, queue: str) -> Setup:
    vt = {"visibility_timeout": VISIBILITY_TIMEOUT}
    if kind == "redis":
        prefix = f"tfpoison{uuid.uuid4().hex[:8]}."
        # The tests kill workers: one killed while it holds kombu's restore mutex would
        # stop every restore for the mutex's life (300 s by default; CI saw it once).
        setup = Setup(kind, services.redis_url(), {**vt, "global_keyprefix": prefix,
                                                   "unacked_mutex_expire": 2.0})
        setup.cleanup.append(lambda: services.redis_delete_prefix(0, prefix))
        return setup
    if kind == "sqlite":
        return Setup(kind, f"sqlite:///{tmp_path / 'broker.sqlite3'}", vt)
    if kind == "postgres":
        prefix = f"tfp{uuid.uuid4().hex[:8]}_"
        url = services.postgres_url()
        setup = Setup(kind, f"sqla+{url}", {**vt, "table_prefix": prefix}, prefix=prefix)
        setup.cleanup.append(lambda: _drop_tables(url, prefix))
        return setup
    url = services.rabbitmq_url()
    queue_type, _, broker_limit = kind.removeprefix("rabbitmq-").partition("+")
    # "+limit": RabbitMQ's own limit too (x-delivery-limit, dead-letter route to <queue>.dead).
    options = {"delivery_limit": LIMIT} if broker_limit else {}
    setup = Setup(kind, url, options, queue_type=queue_type)
    setup.cleanup.append(lambda: services.drop_broker_names(
        url, queues=[queue, queue + ".dead"], exchanges=[queue]))
    return setup


def _drop_tables(url: str, prefix: str) -> None:
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.begin() as conn:
            for name in ("messages", "bindings", "celery_taskmeta", "celery_tasksetmeta"):
                conn.execute(sa.text(f'DROP TABLE IF EXISTS "{prefix}{name}"'))
    finally:
        engine.dispose()


class Fleet:
    """The client (``poproj`` imported here), the workers, the record file, the broker."""

    def __init__(self, setup: Setup, tmp_path: Path, queue: str) -> None:
        self.setup = setup
        self.queue = queue
        self.record = tmp_path / "record.txt"
        env = {
            "TASKFRAME_BROKER_URL": setup.broker,
            "TASKFRAME_RESULT_BACKEND": f"db+sqlite:///{tmp_path / 'results.sqlite3'}",
            "POPROJ_QUEUE": queue,
            "POPROJ_QUEUE_TYPE": setup.queue_type,
            "POPROJ_LIMIT": str(LIMIT),
            "POPROJ_OPTIONS": json.dumps(setup.options),
            "POPROJ_PREFIX": setup.prefix,
            "POPROJ_RECORD": str(self.record),
        }
        self.project = ProjectImport(PROJ_DIR, "poproj", env)
        self.workers = WorkerProcs(PROJ_DIR, "poproj", env, tmp_path)

    @property
    def mod(self) -> ModuleType:
        return self.project.module

    def start(self, *args: str) -> Any:
        proc = self.workers.start("-Q", self.queue, *args)
        wait_until(lambda: " ready" in self.workers.logs[-1].read_text()
                   or proc.poll() is not None, 60, "the worker to be ready")
        assert proc.poll() is None, self.workers.log_text()
        return proc

    def transport(self) -> Transport:
        broker = self.setup.broker
        transport = transport_class(broker)(broker, self.setup.options)
        transport.connect()
        return transport

    def dead(self) -> int:
        """How many messages wait in the queue's dead-letter queue."""
        transport = self.transport()
        try:
            return transport.queue_size(self.queue + ".dead")
        finally:
            transport.close()

    def close(self) -> None:
        self.workers.stop()
        self.project.close()
        for step in self.setup.cleanup:
            step()


def _fleet(kind: str, tmp_path: Path) -> Iterator[Fleet]:
    queue = f"tfpoison-{uuid.uuid4().hex[:10]}"
    fleet = Fleet(_setup(kind, tmp_path, queue), tmp_path, queue)
    try:
        yield fleet
    finally:
        fleet.close()


RABBIT = pytest.mark.rabbitmq
CHILD_KINDS = [pytest.param("redis", marks=pytest.mark.redis), "sqlite",
               pytest.param("postgres", marks=pytest.mark.postgres),
               pytest.param("rabbitmq-quorum", marks=RABBIT),
               pytest.param("rabbitmq-quorum+limit", marks=RABBIT),
               pytest.param("rabbitmq-classic", marks=RABBIT)]


@pytest.fixture(params=CHILD_KINDS)
def fleet(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Fleet]:
    """Every broker, classic and quorum queues on RabbitMQ."""
    yield from _fleet(request.param, tmp_path)


@pytest.fixture(params=[k for k in CHILD_KINDS if "classic" not in str(k)
                        and "+limit" not in str(k)])
def holder_fleet(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Fleet]:
    """Brokers that count a holder's death: not RabbitMQ's classic queues (documented)."""
    yield from _fleet(request.param, tmp_path)


@pytest.fixture(params=[k for k in CHILD_KINDS if "quorum" not in str(k)])
def giveback_fleet(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Fleet]:
    """Brokers that tell a plain give-back from a failed delivery: not RabbitMQ < 4.3's
    quorum queues, which count every return (documented)."""
    yield from _fleet(request.param, tmp_path)


def _assert_stopped(fleet: Fleet, result: Any, n: int) -> None:
    """FAILURE stored, ``LIMIT`` runs exactly, the message in ``<queue>.dead``, logged."""
    exc = result.get(timeout=90, propagate=False)
    assert isinstance(exc, DeliveryLimitExceeded), (exc, fleet.workers.log_text())
    assert result.state == states.FAILURE
    assert f"delivered {LIMIT + 1} times without being settled" in str(exc)
    assert len(fleet.mod.starts(n)) == LIMIT, fleet.workers.log_text()
    # The FAILURE is stored first (the worker's store thread), then it is dead-lettered.
    wait_until(lambda: fleet.dead() == 1, 20, f"the message in {fleet.queue}.dead")
    line = f"[{result.id}] not run: delivered {LIMIT + 1} times"
    wait_until(lambda: line in fleet.workers.log_text(), 20, "the log line")


def test_a_task_that_kills_its_child_stops_after_the_limit(fleet: Fleet) -> None:
    fleet.start("-P", "prefork", "-c", "1")
    result = fleet.mod.crash.delay(1)
    _assert_stopped(fleet, result, 1)
    # The worker goes on: other tasks run, the stopped one does not come back.
    assert fleet.mod.add.delay(2, 3).get(timeout=30) == 5, fleet.workers.log_text()
    assert len(fleet.mod.starts(1)) == LIMIT
    assert all(proc.poll() is None for proc in fleet.workers.procs)


def test_a_message_whose_worker_is_killed_stops_after_the_limit(holder_fleet: Fleet) -> None:
    fleet = holder_fleet
    result = fleet.mod.hold.delay(2)
    for run in range(1, LIMIT + 1):
        victim = fleet.start("-P", "threads", "-c", "1")
        wait_until(lambda run=run: len(fleet.mod.starts(2)) >= run, 60,  # type: ignore[misc]
                   f"run {run} of the held task")
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        expect(victim, exit_codes={-signal.SIGKILL},
               why="the test kills the worker holding the message")
    fleet.start("-P", "threads", "-c", "1")  # restores it after the visibility timeout
    _assert_stopped(fleet, result, 2)
    assert fleet.mod.add.delay(1, 1).get(timeout=30) == 2


def test_warm_shutdown_give_backs_do_not_count(giveback_fleet: Fleet) -> None:
    fleet = giveback_fleet
    first, second = fleet.mod.patient.delay(1), fleet.mod.patient.delay(2)
    cycles = LIMIT + 2
    for cycle in range(1, cycles + 1):
        # One slot: one message runs (and gives itself back when asked to abort), the
        # other waits reserved (given back by the shutdown).
        proc = fleet.start("-P", "threads", "-c", "1")
        wait_until(lambda cycle=cycle: len(fleet.mod.starts(1)) + len(fleet.mod.starts(2))
                   >= cycle, 60, f"a run in cycle {cycle}")  # type: ignore[misc]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, fleet.workers.log_text()
    runs = len(fleet.mod.starts(1)) + len(fleet.mod.starts(2))
    assert runs == cycles, fleet.workers.log_text()
    Path(str(fleet.record) + ".release").touch()
    fleet.start("-P", "threads", "-c", "1")
    assert first.get(timeout=60) == 1, fleet.workers.log_text()
    assert second.get(timeout=60) == 2, fleet.workers.log_text()
    assert fleet.dead() == 0
    assert "not run: delivered" not in fleet.workers.log_text()


@pytest.fixture
def redis_fleet(tmp_path: Path) -> Iterator[Fleet]:
    yield from _fleet("redis", tmp_path)


@pytest.mark.redis
def test_a_stopped_chord_part_fails_the_chord(redis_fleet: Fleet) -> None:
    from taskframe import chord

    fleet = redis_fleet
    fleet.start("-P", "prefork", "-c", "1")
    mod = fleet.mod
    result = chord([mod.add.s(1, 1), mod.crash.s(3)], mod.collect.s()).delay()
    exc = result.get(timeout=90, propagate=False)
    assert result.state == states.FAILURE, (exc, fleet.workers.log_text())
    assert "DeliveryLimitExceeded" in str(exc), exc
    assert len(mod.starts(3)) == LIMIT
