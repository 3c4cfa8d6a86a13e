"""Events both ways with the real celery package: Celery's receiver and State read
taskframe's events; taskframe's receiver reads a Celery worker's events."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import services
from workers import ProjectImport, wait_until, watch

from taskframe.events import EventDispatcher, EventReceiver, event_exchange
from taskframe.transport import Connection, Exchange

pytestmark = [pytest.mark.interop, pytest.mark.redis, pytest.mark.rabbitmq]

PROJ_DIR = Path(__file__).resolve().parent.parent / "integration" / "eventsproj"


@pytest.fixture(params=["amqp", "redis"])
def broker(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """A broker URL and an events exchange name of this test's own."""
    url = services.rabbitmq_url() if request.param == "amqp" else services.redis_url()
    name = f"tfevc-{uuid.uuid4().hex[:8]}"
    yield url, name
    services.drop_broker_names(url, exchanges=[name])


class CeleryMonitor:
    """Celery's ``EventReceiver`` feeding Celery's ``State``, in a thread."""

    def __init__(self, url: str, exchange: str) -> None:
        from celery import Celery

        self.capp = Celery("monitor", broker=url)
        self.capp.conf.event_exchange = exchange
        self.state = self.capp.events.State()
        self.types: list[str] = []
        self.connection = self.capp.connection_for_read()
        self.receiver = self.capp.events.Receiver(self.connection,
                                                  handlers={"*": self._on_event})
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _on_event(self, event: dict[str, Any]) -> None:
        self.types.append(event["type"])
        self.state.event(event)

    def _run(self) -> None:
        for _ in self.receiver.itercapture(limit=None, timeout=None, wakeup=False):
            pass

    def close(self) -> None:
        self.receiver.should_stop = True
        self.thread.join(5)
        self.connection.release()


def test_celery_state_reads_taskframe_events(broker: tuple[str, str]) -> None:
    url, name = broker
    monitor = CeleryMonitor(url, name)
    dispatcher = EventDispatcher(Connection(url), "tf1@events", exchange=event_exchange(url, name))
    task_id = str(uuid.uuid4())
    try:
        def sent_through() -> bool:
            # Until Celery's queue is bound, events are dropped: send the story again.
            dispatcher.send("worker-heartbeat", freq=2.0, active=0, processed=1,
                            loadavg=[0.0, 0.0, 0.0], sw_ident="py-taskframe", sw_ver="0",
                            sw_sys="Linux")
            dispatcher.send("task-received", uuid=task_id, name="evproj.add", args="(2, 3)",
                            kwargs="{}", root_id=task_id, parent_id=None, retries=0, eta=None,
                            expires=None)
            dispatcher.send("task-started", uuid=task_id)
            dispatcher.send("task-succeeded", uuid=task_id, result="5", runtime=0.01)
            dispatcher.flush(5)
            task = monitor.state.tasks.get(task_id)
            return task is not None and task.state == "SUCCESS"

        wait_until(sent_through, 20, "Celery's State to see the task succeed")
    finally:
        dispatcher.close()
        monitor.close()
    worker = monitor.state.workers["tf1@events"]
    assert worker.alive
    task = monitor.state.tasks[task_id]
    assert (task.name, task.args, task.result, task.runtime) == ("evproj.add", "(2, 3)", "5", 0.01)
    assert task.worker is worker
    assert "task-succeeded" in monitor.types


def test_taskframe_receiver_reads_celery_worker_events(
        broker: tuple[str, str], tmp_path: Path) -> None:
    url, name = broker
    queue = f"tfevq-{uuid.uuid4().hex[:8]}"
    env = {"EVPROJ_BROKER": url, "EVPROJ_EXCHANGE": name, "EVPROJ_QUEUE": queue}
    receiver = EventReceiver(Connection(url), exchange=event_exchange(url, name))
    receiver.consume()
    log = tmp_path / "celery.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "cevproj", "worker", "-E", "-P", "solo",
         "-l", "INFO", "-n", "cel@events", "--without-mingle", "--without-gossip"],
        env={**os.environ, **env, "PYTHONPATH": str(PROJ_DIR)}, cwd=PROJ_DIR,
        stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )
    watch(proc, log)
    client = ProjectImport(PROJ_DIR, "cevproj", env)
    events: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + 30
        while not any(e["type"] == "worker-online" for e in events):
            assert time.monotonic() < deadline, log.read_text()
            assert proc.poll() is None, log.read_text()
            events += receiver.poll(0.5)
        task_id = client.module.add.delay(2, 3).id
        while not any(e["type"] == "task-succeeded" for e in events):
            assert time.monotonic() < deadline, log.read_text()
            events += receiver.poll(0.5)
    finally:
        proc.terminate()
        proc.wait(30)
        client.close()
        services.drop_broker_names(url, queues=[queue], exchanges=[queue])
    events += list(receiver.itercapture(timeout=1.0))
    receiver.close()
    online = next(e for e in events if e["type"] == "worker-online")
    assert online["hostname"] == "cel@events" and online["sw_ident"] == "py-celery"
    mine = {e["type"]: e for e in events if e.get("uuid") == task_id}
    assert {"task-received", "task-started", "task-succeeded"} <= set(mine)
    assert mine["task-received"]["name"] == "evproj.add"
    assert mine["task-succeeded"]["result"] == "5"
    assert "worker-offline" in [e["type"] for e in events]


def test_events_exchange_matches_celery(broker: tuple[str, str]) -> None:
    """Declared as Celery declares it: RabbitMQ accepts both declarations (no
    PRECONDITION_FAILED), and on Redis both use fanout channels."""
    from celery import Celery

    url, name = broker
    capp = Celery("decl", broker=url)
    capp.conf.event_exchange = name
    ours = event_exchange(url, name)
    with capp.connection_for_write() as conn:
        dispatcher = capp.events.Dispatcher(conn)
        theirs = dispatcher.exchange
        dispatcher.close()
    assert (ours.name, ours.type) == (theirs.name, theirs.type)
    if ours.type == "topic":
        assert ours.durable == theirs.durable
        with capp.connection_for_write() as conn:
            theirs(conn.default_channel).declare()
        with Connection(url) as tf_conn:
            tf_conn.connect()
            tf_conn.transport.declare_exchange(Exchange(name, "topic", durable=ours.durable))
