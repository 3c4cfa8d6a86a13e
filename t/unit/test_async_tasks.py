"""``async def`` tasks outside the asyncio pool: eager calls, solo and threads workers.

Each run gets an event loop of its own (``taskframe.execution.coroutines.run_coroutine``).
The asyncio pool and the greenlet pools have their own tests in t/integration.
"""

from __future__ import annotations

import asyncio
import os
import textwrap
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import services

from taskframe import SoftTimeLimitExceeded, Task, Taskframe, states
from taskframe.errors import TimeLimitExceeded
from taskframe.execution.coroutines import TIME_LIMIT, BodyRun, is_async_task, run_coroutine
from taskframe.worker.worker import Worker


@pytest.fixture
def app() -> Iterator[Taskframe]:
    app = Taskframe("at", broker=f"memory://{uuid.uuid4().hex}", backend="memory://",
                    set_as_current=False)
    app.conf.task_store_eager_result = True
    yield app
    app.close()


def test_eager_apply_awaits_the_coroutine_with_its_request(app: Taskframe) -> None:
    @app.task(bind=True)
    async def whoami(self: Task[Any, Any], n: int) -> tuple[str | None, int]:
        await asyncio.sleep(0)
        return self.request.id, n * 2

    result = whoami.apply((21,), task_id="fixed-id")
    assert result.state == states.SUCCESS
    assert result.get() == ("fixed-id", 42)
    assert app.backend.get_task_meta("fixed-id")["status"] == states.SUCCESS


def test_eager_failure_keeps_the_coroutine_traceback(app: Taskframe) -> None:
    @app.task
    async def explode() -> None:
        await asyncio.sleep(0)
        raise ValueError("inside the coroutine")

    result = explode.apply()
    assert result.state == states.FAILURE
    assert isinstance(result.result, ValueError)
    assert result.traceback is not None
    assert 'raise ValueError("inside the coroutine")' in result.traceback


def test_autoretry_and_retry_work_in_async_tasks(app: Taskframe) -> None:
    attempts: list[int] = []

    @app.task(autoretry_for=(KeyError,), max_retries=3, retry_backoff=False)
    async def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise KeyError("not yet")
        return "third time"

    @app.task(bind=True, max_retries=2)
    async def retrying(self: Task[Any, Any]) -> int:
        if self.request.retries < 2:
            raise self.retry(countdown=0)
        return self.request.retries

    assert flaky.apply().get() == "third time"
    assert len(attempts) == 3
    assert retrying.apply().get() == 2


def test_apply_inside_a_running_loop_runs_in_a_thread(app: Taskframe) -> None:
    @app.task
    async def where() -> str:
        return threading.current_thread().name

    async def caller() -> str:
        return str(where.apply().get())

    assert asyncio.run(caller()).startswith("taskframe-coro")


def test_is_async_task(app: Taskframe) -> None:
    @app.task
    async def coro_fn() -> None: ...

    @app.task
    def plain() -> None: ...

    class AsyncRun(Task[Any, Any]):
        async def run(self, *args: Any, **kwargs: Any) -> Any:
            return "ran"

    custom = app.register_task(AsyncRun(name="at.custom"))
    assert is_async_task(coro_fn)
    assert not is_async_task(plain)
    assert is_async_task(custom)
    assert custom.apply().get() == "ran"  # a Task subclass with ``async def run``


def test_run_coroutine_returns_the_value_and_raises_the_error() -> None:
    async def value() -> int:
        await asyncio.sleep(0)
        return 7

    async def error() -> None:
        raise LookupError("x")

    assert run_coroutine(value()) == 7
    with pytest.raises(LookupError):
        run_coroutine(error())


@pytest.mark.parametrize("pool", ["solo", "threads"])
def test_async_tasks_on_in_process_workers(app: Taskframe, pool: str) -> None:
    @app.task(bind=True)
    async def double(self: Task[Any, Any], n: int) -> tuple[int, str | None]:
        await asyncio.sleep(0.01)
        return n * 2, self.request.id

    @app.task
    async def fails() -> None:
        raise RuntimeError("async failure")

    worker = Worker(app, pool=pool, concurrency=3, setup_logs=False,
                    install_signal_handlers=False)
    thread = threading.Thread(target=worker.start, daemon=True)
    thread.start()
    try:
        results = [double.delay(n) for n in range(6)]
        failed = fails.delay()
        assert [list(r.get(timeout=10)) for r in results] == [
            [n * 2, r.id] for n, r in enumerate(results)]
        with pytest.raises(RuntimeError, match="async failure"):
            failed.get(timeout=10)
    finally:
        worker.stop()
        thread.join(10)
    assert not thread.is_alive()


@pytest.mark.parametrize("pool", ["solo", "threads"])
def test_async_task_is_cancelled_at_the_shutdown_deadline(app: Taskframe, pool: str) -> None:
    app.conf.worker_soft_shutdown_timeout = 0.2
    seen: list[tuple[bool, str | None]] = []
    started = threading.Event()

    @app.task(bind=True, acks_late=True)
    async def long(self: Task[Any, Any]) -> str:
        if seen:
            return "second run"
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen.append((self.request.should_abort(), self.request.abort_reason))
            raise
        return "slept"

    def run_worker() -> tuple[Worker, threading.Thread]:
        worker = Worker(app, pool=pool, concurrency=2, setup_logs=False,
                        install_signal_handlers=False)
        thread = threading.Thread(target=worker.start, daemon=True)
        thread.start()
        return worker, thread

    worker, thread = run_worker()
    result = long.delay()
    assert started.wait(10)
    worker.stop()
    thread.join(15)
    assert not thread.is_alive()
    assert worker.exit_code == 0  # the task ended when asked: a warm shutdown
    assert seen == [(True, "shutdown")]
    assert result.state == states.PENDING  # nothing stored: it did not finish
    worker, thread = run_worker()  # its message went back to the broker
    try:
        assert result.get(timeout=10) == "second run"
    finally:
        worker.stop()
        thread.join(10)


# -- BodyRun: how the asyncio pool interrupts a body -----------------------------------


def test_body_run_soft_limit_raises_at_the_current_await() -> None:
    async def body() -> str:
        try:
            await asyncio.sleep(10)
        except SoftTimeLimitExceeded:
            await asyncio.sleep(0)  # still a live task: not cancelled any more
            return "handled"
        return "slept"

    async def main() -> str:
        run = BodyRun()
        asyncio.get_running_loop().call_later(0.05, run.soft_limit)
        return await run.run(body())

    assert asyncio.run(main()) == "handled"


def test_body_run_cancel_and_hard_limit() -> None:
    async def body() -> str:
        await asyncio.sleep(10)
        return "slept"

    async def cancelled(reason: str) -> Any:
        run = BodyRun(time_limit=1.5)
        asyncio.get_running_loop().call_later(0.05, run.cancel, reason)
        return await run.run(body())

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(cancelled("shutdown"))
    with pytest.raises(TimeLimitExceeded) as info:
        asyncio.run(cancelled(TIME_LIMIT))
    assert info.value.args == (1.5,)


def test_body_run_decided_before_the_body_started() -> None:
    async def body() -> str:
        return "ran"

    async def soft_first() -> str:
        run = BodyRun()
        run.soft_limit()
        return await run.run(body())

    with pytest.raises(SoftTimeLimitExceeded):
        asyncio.run(soft_first())


# -- typing ----------------------------------------------------------------------------

ASYNC_SNIPPET = textwrap.dedent('''\
    from typing import Any
    from taskframe import Task, Taskframe

    app = Taskframe("typing")

    @app.task
    async def fetch(url: str, retries: int = 1) -> int:
        return len(url) * retries

    @app.task(bind=True)
    async def bound(self: Task[Any, Any], url: str) -> str:
        return url

    async def direct() -> int:
        return await fetch("x")  # calling the task runs the function: a coroutine

    n: int = fetch.delay("x", retries=2).get()  # the coroutine's value, not a coroutine
    m: int = fetch.apply_async(("x",), countdown=1).get()
    e: int = fetch.apply(("x",)).get()
    fetch.delay(1)  # line 20: error expected
    bound.delay(2)  # line 21: error expected
    wrong: str = fetch.delay("x").get()  # line 22: error expected
    s: str = bound.delay("x").get()
''')


def test_async_tasks_type_check(tmp_path: Path) -> None:
    api = services.require_module("mypy.api")
    root = Path(__file__).resolve().parents[2]
    pkg = tmp_path / "tree" / "taskframe"
    pkg.mkdir(parents=True)
    for entry in (root / "taskframe").iterdir():
        (pkg / entry.name).symlink_to(entry)
    (pkg / "transport").symlink_to(root / "transport")
    (pkg / "backends").symlink_to(root / "backends")
    snippet = tmp_path / "snippet.py"
    snippet.write_text(ASYNC_SNIPPET)
    saved = os.environ.get("MYPYPATH")
    os.environ["MYPYPATH"] = str(tmp_path / "tree")
    try:
        stdout, stderr, _ = api.run([str(snippet), "--no-incremental", "--follow-imports=silent",
                                     "--ignore-missing-imports", "--cache-dir", os.devnull,
                                     "--config-file", os.devnull])
    finally:
        if saved is None:
            os.environ.pop("MYPYPATH", None)
        else:
            os.environ["MYPYPATH"] = saved
    lines = {int(line.split(":")[1]) for line in stdout.splitlines() if ": error:" in line}
    assert lines == {20, 21, 22}, stdout + stderr
