"""The worker loop end to end on the in-process memory broker and memory results."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from taskframe import Task, Taskframe, states
from taskframe.errors import BackendError, DeliveryLimitExceeded, NotRegistered, TaskRevokedError
from taskframe.transport import Envelope
from taskframe.transport.errors import PublishError, TransportError
from taskframe.transport.memory import MemoryTransport
from taskframe.worker.worker import Worker


@pytest.fixture
def app() -> Iterator[Taskframe]:
    app = Taskframe("wm", broker=f"memory://{uuid.uuid4().hex}", backend="memory://",
                    set_as_current=False)
    yield app
    app.close()


def start_worker(app: Taskframe, **kwargs: Any) -> tuple[Worker, threading.Thread]:
    worker = Worker(app, pool=kwargs.pop("pool", "threads"),
                    concurrency=kwargs.pop("concurrency", 2),
                    setup_logs=False, install_signal_handlers=False, **kwargs)
    thread = threading.Thread(target=worker.start, daemon=True)
    thread.start()
    return worker, thread


@pytest.fixture
def run_worker(app: Taskframe) -> Iterator[Any]:
    started: list[tuple[Worker, threading.Thread]] = []

    def start(**kwargs: Any) -> Worker:
        pair = start_worker(app, **kwargs)
        started.append(pair)
        return pair[0]

    yield start
    for worker, thread in started:
        worker.stop()
        thread.join(10)
        assert not thread.is_alive(), "worker did not stop"


@pytest.mark.parametrize("pool", ["solo", "threads"])
def test_results_and_failures(app: Taskframe, run_worker: Any, pool: str) -> None:
    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    @app.task
    def div(x: int, y: int) -> float:
        return x / y

    run_worker(pool=pool)
    results = [add.delay(i, i) for i in range(20)]
    assert [r.get(timeout=10) for r in results] == [2 * i for i in range(20)]
    failed = div.delay(1, 0)
    with pytest.raises(ZeroDivisionError):
        failed.get(timeout=10)
    assert failed.state == states.FAILURE


def test_retry_goes_through_the_broker(app: Taskframe, run_worker: Any) -> None:
    @app.task(bind=True, max_retries=3, default_retry_delay=0.05)
    def flaky(self: Task[Any, Any]) -> int:
        if self.request.retries < 2:
            raise self.retry(exc=ConnectionError("later"))
        return self.request.retries

    run_worker()
    assert flaky.delay().get(timeout=10) == 2


def test_countdown_runs_later(app: Taskframe, run_worker: Any) -> None:
    @app.task
    def ping() -> str:
        return "pong"

    run_worker()
    result = ping.apply_async(countdown=0.3)
    assert result.state == states.PENDING
    assert result.get(timeout=10) == "pong"


def test_expired_task_is_revoked_not_run(app: Taskframe, run_worker: Any) -> None:
    ran: list[int] = []

    @app.task
    def never() -> None:
        ran.append(1)

    result = never.apply_async(expires=-1)
    run_worker()
    with pytest.raises(TaskRevokedError):
        result.get(timeout=10)
    assert result.state == states.REVOKED
    assert ran == []


def test_garbage_is_rejected_and_the_worker_goes_on(
    app: Taskframe, run_worker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    @app.task
    def ok() -> str:
        return "still alive"

    caplog.set_level(logging.INFO)
    conn = app.producer_connection()
    transport = conn.transport
    transport.declare(app.router.queue("celery"))
    bad_id = str(uuid.uuid4())
    garbage = [
        Envelope(b"{not json", "application/json", "utf-8",
                 {"task": ok.name, "id": str(uuid.uuid4())}),
        Envelope(b"[[], {}, {}]", "application/json", "utf-8", {"lang": "py"}),
        Envelope(b"[[], {}, {}]", "application/json", "utf-8",
                 {"task": "no.such.task", "id": bad_id}),
        Envelope(b"\x80\x04K\x01.", "application/x-python-serialize", "binary",
                 {"task": ok.name, "id": str(uuid.uuid4())}),
    ]
    for envelope in garbage:
        transport.publish(envelope, exchange="", routing_key="celery")
    run_worker()
    assert ok.delay().get(timeout=10) == "still alive"
    unknown = app.AsyncResult(bad_id)
    with pytest.raises(NotRegistered):
        unknown.get(timeout=10)
    rejected = [r for r in caplog.records if r.getMessage().startswith("Rejected message")]
    assert len(rejected) == 3, [r.getMessage() for r in rejected]
    assert any("unregistered task" in r.getMessage() for r in caplog.records)
    assert transport.queue_size("celery") == 0


def test_link_callback_gets_the_result(app: Taskframe, run_worker: Any) -> None:
    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    run_worker()
    callback_id = str(uuid.uuid4())
    add.apply_async((1, 2), link=add.s(10).set(task_id=callback_id)).get(timeout=10)
    assert app.AsyncResult(callback_id).get(timeout=10) == 13


def test_warm_shutdown_finishes_running_late_ack_task(app: Taskframe) -> None:
    started = threading.Event()
    release = threading.Event()

    @app.task(acks_late=True)
    def slow() -> str:
        started.set()
        release.wait(10)
        return "done"

    worker, thread = start_worker(app)
    result = slow.delay()
    assert started.wait(10)
    worker.stop()
    release.set()
    thread.join(10)
    assert not thread.is_alive()
    assert result.get(timeout=10) == "done"
    assert worker.exit_code == 0


def test_soft_shutdown_deadline_asks_running_tasks_to_abort(app: Taskframe) -> None:
    started = threading.Event()
    seen: list[str | None] = []

    @app.task(bind=True, acks_late=True)
    def patient(self: Task[Any, Any]) -> str:
        started.set()
        while not self.request.should_abort():
            threading.Event().wait(0.02)
        seen.append(self.request.abort_reason)
        return "aborted cleanly"

    app.conf.worker_soft_shutdown_timeout = 0.2
    worker, thread = start_worker(app)
    result = patient.delay()
    assert started.wait(10)
    worker.stop()
    thread.join(20)
    assert not thread.is_alive()
    assert seen == ["shutdown"]
    assert result.get(timeout=10) == "aborted cleanly"


def test_error_in_a_hook_does_not_strand_the_message(app: Taskframe, run_worker: Any) -> None:
    class BadHook(Task[Any, Any]):
        def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
            raise RuntimeError("hook bug")

    @app.task(base=BadHook, acks_late=True)
    def fine() -> int:
        return 1

    worker = run_worker()
    assert fine.delay().get(timeout=10) == 1
    consumer = worker.consumer
    assert consumer is not None
    deadline = threading.Event()
    for _ in range(100):
        if consumer.held == 0:
            break
        deadline.wait(0.05)
    assert consumer.held == 0


def test_solo_keeps_claims_fresh_while_a_long_task_runs(tmp_path: Any) -> None:
    """A task longer than the visibility timeout runs once on solo (SQLite broker)."""
    db = tmp_path / "solo.sqlite3"
    app = Taskframe("solo", broker=f"sqlite:///{db}", backend=f"db+sqlite:///{db}",
                    set_as_current=False)
    app.conf.broker_transport_options = {"visibility_timeout": 1.0}
    runs: list[int] = []

    @app.task(acks_late=True)
    def long_task() -> int:
        runs.append(1)
        threading.Event().wait(2.5)
        return len(runs)

    result = long_task.delay()
    first, t1 = start_worker(app, pool="solo")
    second, t2 = start_worker(app, pool="solo")
    try:
        assert result.get(timeout=30) == 1
        threading.Event().wait(1.5)  # a stolen copy would start now
        assert runs == [1]
    finally:
        for worker, thread in ((first, t1), (second, t2)):
            worker.stop()
            thread.join(15)
        app.close()


def test_track_started_shows_started_while_running(app: Taskframe, run_worker: Any) -> None:
    running = threading.Event()
    release = threading.Event()

    @app.task(track_started=True)
    def tracked() -> str:
        running.set()
        release.wait(10)
        return "ok"

    run_worker()
    result = tracked.delay()
    assert running.wait(10)
    try:
        assert result.state == states.STARTED
        assert result.info["pid"] > 0 and result.info["hostname"]
    finally:
        release.set()
    assert result.get(timeout=10) == "ok"


def test_worker_consumes_only_its_queues(app: Taskframe, run_worker: Any) -> None:
    @app.task
    def where(tag: str) -> str:
        return tag

    fast = where.apply_async(("fast",), queue="fast")
    slow = where.apply_async(("slow",), queue="slow")
    run_worker(queues=["fast"])
    assert fast.get(timeout=10) == "fast"
    threading.Event().wait(0.3)
    assert slow.state == states.PENDING
    assert app.producer_connection().transport.queue_size("slow") == 1


async def _await_a_cancelled_helper() -> None:
    helper = asyncio.ensure_future(asyncio.sleep(30))
    helper.cancel()
    await helper  # raises CancelledError into the task body: the task's own


@pytest.mark.parametrize("pool", ["solo", "threads", "asyncio"])
@pytest.mark.parametrize("exit_kind", ["SystemExit", "KeyboardInterrupt", "CancelledError"])
def test_a_body_raising_a_base_exception_fails_and_frees_its_slot(
        app: Taskframe, run_worker: Any, pool: str, exit_kind: str) -> None:
    """One slot, prefetch 1, acks_late: before the fix the slot leaked (solo never polled
    again; the asyncio pool took the task's own CancelledError for a shutdown and requeued
    it forever) and no task after it ran."""

    @app.task(acks_late=True)
    async def bail() -> None:
        if exit_kind == "SystemExit":
            raise SystemExit(3)
        if exit_kind == "KeyboardInterrupt":
            raise KeyboardInterrupt
        await _await_a_cancelled_helper()

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    run_worker(pool=pool, concurrency=1, prefetch_multiplier=1)
    failed = bail.delay()
    later = [add.delay(i, i) for i in range(5)]
    assert [r.get(timeout=15) for r in later] == [0, 2, 4, 6, 8]
    with pytest.raises(BaseException) as info:
        failed.get(timeout=5)
    assert type(info.value).__name__ == exit_kind
    assert failed.state == states.FAILURE


def test_an_expired_message_while_the_result_store_is_down_does_not_stop_the_loop(
        app: Taskframe, run_worker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Storing REVOKED for an expired message raised out of the consumer loop, and the
    worker stopped consuming (its next one would meet the same message)."""
    ran: list[int] = []

    @app.task
    def never() -> None:
        ran.append(1)

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    def store_down(*args: Any, **kwargs: Any) -> None:
        raise BackendError("the result store is down")

    monkeypatch.setattr(app.backend, "mark_as_revoked", store_down)
    never.apply_async(expires=-1)
    run_worker(pool="solo")
    assert add.delay(2, 3).get(timeout=10) == 5
    assert ran == []


def test_a_refused_deferral_keeps_the_eta_in_the_worker(
        app: Taskframe, run_worker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A far ETA goes back to the broker delayed; a broker that refuses that copy (a nack,
    a delay over its limit) made the loop exit. Now the worker keeps the ETA itself."""
    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    original = MemoryTransport.publish

    def refuse_delays(self: Any, envelope: Any, **kwargs: Any) -> None:
        if kwargs.get("delay"):
            if threading.current_thread() is not threading.main_thread():
                raise PublishError("delay refused by the broker")  # the worker's deferral
            kwargs["delay"] = None  # the client sends the ETA in the message only (as Celery)
        original(self, envelope, **kwargs)

    monkeypatch.setattr(MemoryTransport, "publish", refuse_delays)
    run_worker(pool="solo")
    later = add.apply_async((1, 2), countdown=2.5)  # past LOCAL_ETA_WINDOW
    assert add.delay(2, 3).get(timeout=10) == 5
    assert later.get(timeout=15) == 3


def test_a_broker_error_in_a_turn_reconnects_instead_of_stopping_the_worker(
        app: Taskframe, run_worker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A broker error that is not a lost connection (Redis READONLY after a failover,
    LOADING, MISCONF) left the consumer loop and the worker stopped consuming."""
    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    original = MemoryTransport.poll
    failures = [TransportError("READONLY You can't write against a read only replica.")]

    def poll_once_failing(self: Any, timeout: float | None = None) -> Any:
        if failures:
            raise failures.pop()
        return original(self, timeout)

    worker = run_worker(pool="solo")
    assert add.delay(1, 1).get(timeout=10) == 2
    monkeypatch.setattr(MemoryTransport, "poll", poll_once_failing)
    assert add.delay(2, 3).get(timeout=10) == 5
    assert failures == []
    assert worker.consumer is not None and not worker.consumer.stopping


def test_a_body_that_decompresses_past_the_limit_is_rejected_before_it_grows(
        app: Taskframe, run_worker: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A small compressed body that decompresses to a huge one (a "zip bomb") was
    decompressed whole: enough of them OOM-kill the worker, and the redelivered message the
    next. Now decompression stops at ``worker_max_message_size`` and the message is
    rejected with one log line; the worker goes on."""
    ran: list[int] = []

    @app.task
    def measure(text: str) -> int:
        ran.append(len(text))
        return len(text)

    app.conf.worker_max_message_size = 1024 * 1024
    caplog.set_level(logging.INFO)
    bomb = measure.apply_async(("x" * 20_000_000,), compression="zlib")
    run_worker(pool="solo")
    assert measure.delay("small").get(timeout=10) == 5
    assert ran == [5]
    assert bomb.state == states.PENDING
    rejected = [r.getMessage() for r in caplog.records
                if r.getMessage().startswith("Rejected message")]
    assert len(rejected) == 1 and "decompresses to more than 1048576 bytes" in rejected[0]


def _wait(predicate: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _fail_deliveries(app: Taskframe, count: int, queue: str = "celery") -> None:
    """Take every message of ``queue`` and give it back as failed, ``count`` times (as the
    worker does when the child running it dies)."""
    transport = MemoryTransport(app.broker_url, {})
    transport.connect()
    try:
        transport.consume([app.router.queue(queue)])
        for _ in range(count):
            for message in transport.poll(timeout=1):
                message.requeue_failed()
    finally:
        transport.close()


def test_a_message_over_the_delivery_limit_is_stopped_not_run(
        app: Taskframe, run_worker: Any, caplog: pytest.LogCaptureFixture) -> None:
    ran: list[int] = []
    errbacks: list[str] = []

    @app.task(acks_late=True)
    def poison(n: int) -> int:
        ran.append(n)
        return n

    @app.task
    def on_error(request: Any, exc: BaseException, traceback: str) -> None:
        errbacks.append(type(exc).__name__)

    app.conf.worker_delivery_limit = 2
    caplog.set_level(logging.INFO)
    stopped = poison.apply_async((1,), link_error=on_error.s())
    within = poison.delay(2)
    _fail_deliveries(app, 2)  # each now delivered 3 times: over the limit of 2
    fresh = poison.delay(3)
    run_worker()
    assert fresh.get(timeout=10) == 3
    with pytest.raises(DeliveryLimitExceeded, match="delivered 3 times without being settled"):
        stopped.get(timeout=10)
    with pytest.raises(DeliveryLimitExceeded):
        within.get(timeout=10)
    assert ran == [3]
    deadline = time.monotonic() + 10
    while not errbacks and time.monotonic() < deadline:  # the errback is a task too
        time.sleep(0.05)
    assert errbacks == ["DeliveryLimitExceeded"]
    # The FAILURE is stored first (the store thread), then the loop dead-letters and logs.
    transport = app.producer_connection().transport
    _wait(lambda: transport.queue_size("celery.dead") == 2, "the dead letters")
    lines = [r.getMessage() for r in caplog.records if "not run: delivered" in r.getMessage()]
    assert len(lines) == 2 and "dead-lettered to celery.dead" in lines[0], lines
    assert transport.queue_size("celery") == 0


def test_without_a_delivery_limit_the_message_runs(app: Taskframe, run_worker: Any) -> None:
    @app.task(acks_late=True)
    def poison(n: int) -> int:
        return n

    app.conf.worker_delivery_limit = None
    result = poison.delay(1)
    _fail_deliveries(app, 5)
    run_worker()
    assert result.get(timeout=10) == 1


def test_an_undecodable_message_over_the_limit_is_stopped_by_its_headers(
        app: Taskframe, run_worker: Any, caplog: pytest.LogCaptureFixture) -> None:
    app.conf.worker_delivery_limit = 1
    caplog.set_level(logging.INFO)
    transport = app.producer_connection().transport
    transport.declare(app.router.queue("celery"))
    task_id = str(uuid.uuid4())
    transport.publish(Envelope(b"{not json", "application/json", "utf-8",
                               {"task": "some.task", "id": task_id}),
                      exchange="", routing_key="celery")
    _fail_deliveries(app, 1)
    run_worker()
    with pytest.raises(DeliveryLimitExceeded):
        app.AsyncResult(task_id).get(timeout=10)
    _wait(lambda: transport.queue_size("celery.dead") == 1, "the dead letter")
    assert any(f"some.task[{task_id}] not run" in r.getMessage() for r in caplog.records)
