"""A project for the pool tests: configured from the environment, one task per behaviour.

POOLPROJ_BROKER / POOLPROJ_BACKEND name the servers, POOLPROJ_PREFIX the Redis key prefix
(broker and results), POOLPROJ_RECORD a file every run appends lines to: ``start``/``end``
lines carry ``time.monotonic()`` so a test can measure how many runs overlapped.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from taskframe import SoftTimeLimitExceeded, Task, Taskframe

PREFIX = os.environ.get("POOLPROJ_PREFIX", "")

app = Taskframe("poolproj", broker=os.environ.get("POOLPROJ_BROKER"),
                backend=os.environ.get("POOLPROJ_BACKEND"))
app.conf.broker_transport_options = {"global_keyprefix": PREFIX}
app.conf.result_backend_transport_options = {"global_keyprefix": PREFIX}
app.conf.task_default_queue = f"{PREFIX}tasks"
app.conf.worker_prefetch_multiplier = 1
app.conf.worker_pool = os.environ.get("POOLPROJ_WORKER_POOL", "threads")


def record(*words: Any) -> None:
    """Append one line (atomic for short O_APPEND writes)."""
    fd = os.open(os.environ["POOLPROJ_RECORD"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (" ".join(str(w) for w in words) + "\n").encode())
    finally:
        os.close(fd)


@app.task(name="poolproj.add")
def add(a: int, b: int) -> int:
    return a + b


@app.task(name="poolproj.aadd")
async def aadd(a: int, b: int) -> int:
    await asyncio.sleep(0.01)
    return a + b


@app.task(name="poolproj.boom")
def boom() -> None:
    raise ValueError("boom")


@app.task(name="poolproj.aboom")
async def aboom() -> None:
    await asyncio.sleep(0)
    raise KeyError("aboom")


@app.task(name="poolproj.exits", acks_late=True)
def exits(kind: str) -> None:
    """A body that raises a BaseException of its own (not the pool's interruption)."""
    raise SystemExit(3) if kind == "SystemExit" else KeyboardInterrupt()


@app.task(name="poolproj.acancelled", acks_late=True)
async def acancelled() -> None:
    """An async body whose own helper is cancelled: CancelledError is the task's failure."""
    helper = asyncio.ensure_future(asyncio.sleep(30))
    helper.cancel()
    await helper


@app.task(name="poolproj.whoami", bind=True)
async def whoami(self: Task[Any, Any]) -> str | None:
    """The request id seen inside an async task (``self.request`` works there too)."""
    await asyncio.sleep(0)
    return self.request.id


@app.task(name="poolproj.loop_kind")
async def loop_kind() -> str:
    return type(asyncio.get_running_loop()).__module__


@app.task(name="poolproj.nap")
def nap(n: int, seconds: float) -> int:
    record("start", n, time.monotonic())
    time.sleep(seconds)
    record("end", n, time.monotonic())
    return n


@app.task(name="poolproj.anap")
async def anap(n: int, seconds: float) -> int:
    record("start", n, time.monotonic())
    await asyncio.sleep(seconds)
    record("end", n, time.monotonic())
    return n


@app.task(name="poolproj.revoke_next", bind=True)
def revoke_next(self: Task[Any, Any], victim_id: str, wait: float) -> str:
    """Waits ``wait`` seconds (the next task reaches the pool meanwhile and waits there for
    this slot), revokes ``victim_id`` on this worker and returns as soon as the worker has
    confirmed: the slot frees with the revoke just landed, the race a check when the slot
    takes its next job must win."""
    time.sleep(wait)
    replies = app.control.revoke(victim_id, destination=[self.request.hostname], reply=True,
                                 timeout=10)
    if not replies:
        record("unconfirmed", victim_id)
    return victim_id


@app.task(name="poolproj.soft")
def soft(seconds: float) -> str:
    """Sleeps; returns "soft" when its soft time limit interrupts it."""
    try:
        time.sleep(seconds)
    except SoftTimeLimitExceeded:
        return "soft"
    return "slept"


@app.task(name="poolproj.asoft")
async def asoft(seconds: float) -> str:
    try:
        await asyncio.sleep(seconds)
    except SoftTimeLimitExceeded:
        return "soft"
    return "slept"


@app.task(name="poolproj.asoft_uncaught")
async def asoft_uncaught(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "slept"


@app.task(name="poolproj.hard")
def hard(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"


@app.task(name="poolproj.ahard")
async def ahard(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "slept"


@app.task(name="poolproj.wait_abort", bind=True, acks_late=True)
def wait_abort(self: Task[Any, Any], limit: float) -> str | None:
    """Runs until the worker asks it to abort (or ``limit`` seconds); returns the reason."""
    record("started", self.request.id)
    deadline = time.monotonic() + limit
    while not self.request.should_abort() and time.monotonic() < deadline:
        time.sleep(0.05)
    record("aborted", self.request.abort_reason)
    return self.request.abort_reason


@app.task(name="poolproj.await_cancel", bind=True, acks_late=True)
async def await_cancel(self: Task[Any, Any], seconds: float) -> str:
    """Sleeps ``seconds``; records a cancellation (and lets it propagate)."""
    record("started", self.request.id)
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        record("cancelled", self.request.should_abort(), self.request.abort_reason)
        raise
    record("done", self.request.id)
    return "done"
