"""The rpc:// result backend on RabbitMQ and Redis: replies as messages to the sender's queue,
with our worker and with Celery 5.7 on either end (a Celery client, a Celery worker)."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import celery
import pytest
import services
from celery.app.task import Context as CeleryContext

from taskframe import ResultSet, Taskframe, Worker, states
from taskframe.backends import BackendOptions, create_backend
from taskframe.backends.rpc import RPCBackend
from taskframe.errors import ImproperlyConfigured
from taskframe.protocol import ResultContext
from taskframe.transport import Connection

DB = 10
PATIENCE = 60.0  # a guard against hanging, never a timing assertion


@dataclass
class Setup:
    broker: str
    url: str
    name: str  # the task queue; replies go to "<name>-replies"
    app: Taskframe


@pytest.fixture(params=["amqp", "redis"])
def setup(request: pytest.FixtureRequest) -> Iterator[Setup]:
    broker = str(request.param)
    url = services.rabbitmq_url() if broker == "amqp" else services.redis_url(DB)
    name = f"tfrpc-{uuid.uuid4().hex[:10]}"
    app = Taskframe("rpc", broker=url, backend="rpc://", set_as_current=False)
    app.conf.task_default_queue = name
    app.origin = f"{name}-replies"  # this client's reply queue, unique to the test

    @app.task(name="rpc.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="rpc.boom")
    def boom(message: str) -> None:
        raise ValueError(message)

    @app.task(name="rpc.flaky", bind=True, default_retry_delay=0.01)
    def flaky(self: Any) -> int:
        if self.request.retries < 1:
            raise self.retry(exc=ConnectionError("once more"))
        return self.request.retries

    yield Setup(broker, url, name, app)
    app.close()
    services.drop_broker_names(url, queues=[name, f"{name}-replies"],
                               exchanges=[name, f"{name}-replies"], db=DB)


@pytest.fixture
def worker(setup: Setup) -> Iterator[Worker]:
    worker = Worker(setup.app, pool="threads", concurrency=2, setup_logs=False,
                    install_signal_handlers=False)
    thread = threading.Thread(target=worker.start, daemon=True)
    thread.start()
    yield worker
    worker.stop()
    thread.join(PATIENCE)
    assert not thread.is_alive(), "worker did not stop"


def test_results_come_back_as_messages(setup: Setup, worker: Worker) -> None:
    app = setup.app
    result = app.send_task("rpc.add", (2, 3))
    assert result.get(timeout=PATIENCE) == 5
    assert result.state == states.SUCCESS and result.exists()
    failed = app.send_task("rpc.boom", ("no luck",))
    with pytest.raises(ValueError, match="no luck"):
        failed.get(timeout=PATIENCE)
    assert failed.state == states.FAILURE and "ValueError" in (failed.traceback or "")
    many = ResultSet([app.send_task("rpc.add", (i, i)) for i in range(10)])
    assert many.get(timeout=PATIENCE) == [2 * i for i in range(10)]
    result.forget()
    assert not result.exists()  # nothing is stored: forget drops this process's copy


def test_a_retried_tasks_result_reaches_the_client(setup: Setup, worker: Worker) -> None:
    # A client of its own (the worker's app replies as its node name): the next run keeps
    # the first message's reply_to, so the final result comes back to this client.
    client = Taskframe("rpc-client", broker=setup.url, backend="rpc://", set_as_current=False)
    client.conf.task_default_queue = setup.name
    client.origin = f"{setup.name}-client"
    try:
        assert client.send_task("rpc.flaky").get(timeout=10) == 1
    finally:
        client.close()
        services.drop_broker_names(setup.url, queues=[client.origin],
                                   exchanges=[client.origin], db=DB)


def test_waiters_in_many_threads_share_the_reply_queue(setup: Setup, worker: Worker) -> None:
    app = setup.app
    results = [app.send_task("rpc.add", (i, 100)) for i in range(12)]
    got: dict[int, Any] = {}

    def wait(i: int) -> None:
        got[i] = results[i].get(timeout=PATIENCE)

    threads = [threading.Thread(target=wait, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(PATIENCE)
    assert got == {i: i + 100 for i in range(12)}


def test_celery_client_reads_our_workers_replies(setup: Setup, worker: Worker) -> None:
    capp = celery.Celery("rpc-client", broker=setup.url, backend="rpc://",
                         set_as_current=False)
    capp.conf.task_default_queue = setup.name
    try:
        assert capp.send_task("rpc.add", (20, 22)).get(timeout=PATIENCE) == 42
        failed = capp.send_task("rpc.boom", ("from celery",))
        exc = failed.get(timeout=PATIENCE, propagate=False)
        assert type(exc) is ValueError and exc.args == ("from celery",)
    finally:
        capp.close()
        # Celery's reply queue is auto-delete (gone with its consumer); on Redis
        # its list may stay behind: it is named by Celery's oid.
        if setup.broker == "redis":
            services.redis_delete_prefix(DB, str(capp.thread_oid))


def test_our_client_reads_a_celery_workers_replies(setup: Setup) -> None:
    from celery.contrib.testing.worker import start_worker

    capp = celery.Celery("rpc-celery-worker", broker=setup.url, backend="rpc://",
                         set_as_current=False)
    capp.conf.task_default_queue = setup.name
    capp.conf.worker_enable_remote_control = False

    @capp.task(name=f"{setup.name}.mul")  # unique: Celery warns about reused names
    def mul(x: int, y: int) -> int:
        return x * y

    @capp.task(name=f"{setup.name}.fail")
    def fail() -> None:
        raise KeyError("celery side")

    try:
        with start_worker(capp, pool="solo", perform_ping_check=False, loglevel="WARNING",
                          shutdown_timeout=PATIENCE):
            assert setup.app.send_task(f"{setup.name}.mul", (6, 7)).get(timeout=PATIENCE) == 42
            with pytest.raises(KeyError, match="celery side"):
                setup.app.send_task(f"{setup.name}.fail").get(timeout=PATIENCE)
    finally:
        capp.close()


def test_we_read_replies_celery_sends(setup: Setup) -> None:
    app = setup.app
    task_id = str(uuid.uuid4())
    app.backend.on_task_call(task_id, app.origin)  # the reply queue exists before the reply
    capp = celery.Celery("rpc-worker", broker=setup.url, backend="rpc://",
                         set_as_current=False)
    try:
        request = CeleryContext(id=task_id, reply_to=app.origin, correlation_id=task_id)
        capp.backend.store_result(task_id, None, "STARTED", request=request)
        capp.backend.store_result(task_id, {"sum": [1, 2]}, "SUCCESS", request=request)
    finally:
        capp.close()
    assert app.AsyncResult(task_id).get(timeout=PATIENCE) == {"sum": [1, 2]}


def test_backend_without_the_app(setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    reply_to = f"{setup.name}-replies"
    options = BackendOptions(connection=lambda: Connection(setup.url), reply_to=reply_to)
    backend = create_backend("rpc://", options)
    assert isinstance(backend, RPCBackend)
    try:
        task_id = str(uuid.uuid4())
        backend.on_task_call(task_id, reply_to)
        # No reply_to: nothing is sent (the meta is still returned).
        assert backend.store_result(task_id, 1, states.SUCCESS)["status"] == states.SUCCESS
        assert backend.get_task_meta(task_id)["status"] == states.PENDING
        context = ResultContext(reply_to=reply_to, correlation_id=task_id)
        backend.mark_as_started(task_id, context=context)
        backend.mark_as_done(task_id, [1], context=context)
        backend.mark_as_started(task_id, context=context)  # late: never hides the SUCCESS
        assert backend.wait_for(task_id, timeout=PATIENCE)["result"] == [1]
        assert backend.get_task_metas([task_id, "other"])[task_id]["status"] == states.SUCCESS
        for unsupported in (lambda: backend.save_group("g", []),
                            lambda: backend.restore_group("g"), lambda: backend.incr("k")):
            with pytest.raises(ImproperlyConfigured, match="rpc"):
                unsupported()
        if setup.broker == "amqp":  # RabbitMQ returns unroutable replies: logged, dropped
            gone = ResultContext(reply_to=f"{setup.name}-nobody", correlation_id=task_id)
            with caplog.at_level(logging.WARNING, logger="taskframe.backends.rpc"):
                backend.mark_as_done("t-gone", 1, context=gone)
            assert "not delivered" in caplog.text
    finally:
        backend.close()
