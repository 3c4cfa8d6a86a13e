"""Worker start/stop hooks (``app.on_worker_start`` / ``app.on_worker_stop``)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from taskframe import Taskframe
from taskframe.worker.worker import EX_SOFTWARE, Worker


@pytest.fixture
def app() -> Iterator[Taskframe]:
    app = Taskframe("hooks", broker=f"memory://{uuid.uuid4().hex}", backend="memory://",
                    set_as_current=False)
    yield app
    app.close()


def make_worker(app: Taskframe) -> Worker:
    return Worker(app, pool="threads", concurrency=2, setup_logs=False,
                  install_signal_handlers=False)


def test_sync_and_async_hooks_run_around_the_tasks(app: Taskframe) -> None:
    events: list[str] = []
    resource: dict[str, Any] = {}

    @app.on_worker_start
    def open_pool() -> None:
        resource["pool"] = "open"
        events.append("start")

    @app.on_worker_start
    async def warm_up() -> None:
        events.append("async start")

    @app.on_worker_stop
    async def close_pool() -> None:
        resource["pool"] = "closed"
        events.append("async stop")

    @app.task
    def uses_pool() -> str:
        events.append("task")
        return str(resource["pool"])

    worker = make_worker(app)
    thread = threading.Thread(target=worker.start, daemon=True)
    thread.start()
    assert uses_pool.delay().get(timeout=10) == "open"
    worker.stop()
    thread.join(10)
    assert events == ["start", "async start", "task", "async stop"]
    assert resource["pool"] == "closed"


def test_a_failing_start_hook_stops_the_worker_before_it_takes_messages(app: Taskframe) -> None:
    @app.on_worker_start
    def broken() -> None:
        raise RuntimeError("database is down")

    @app.task
    def never() -> None:
        raise AssertionError("must not run")

    result = never.delay()
    worker = make_worker(app)
    assert worker.start() == EX_SOFTWARE
    assert worker.consumer is None
    assert result.state == "PENDING"


def test_asyncio_pool_runs_hooks_on_its_own_loop(app: Taskframe) -> None:
    import asyncio

    loops: dict[str, Any] = {}

    @app.on_worker_start
    async def open_pool() -> None:
        loops["hook"] = asyncio.get_running_loop()

    @app.task
    async def which_loop() -> bool:
        return asyncio.get_running_loop() is loops["hook"]

    worker = Worker(app, pool="asyncio", concurrency=2, setup_logs=False,
                    install_signal_handlers=False)
    thread = threading.Thread(target=worker.start, daemon=True)
    thread.start()
    try:
        assert which_loop.delay().get(timeout=10) is True
    finally:
        worker.stop()
        thread.join(10)
