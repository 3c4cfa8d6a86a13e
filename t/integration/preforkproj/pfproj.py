"""A project for the prefork pool tests, configured from the environment.

TASKFRAME_BROKER_URL / TASKFRAME_RESULT_BACKEND pick the servers; PFPROJ_RECORD names a file
that children and tasks append one line to (``init <pid>``, ``down <pid>``, ``start <n> <pid>``).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from taskframe import Taskframe
from taskframe.errors import SoftTimeLimitExceeded
from taskframe.signals import worker_process_init, worker_process_shutdown

app = Taskframe("pfproj")


def _record(line: str) -> None:
    fd = os.open(os.environ["PFPROJ_RECORD"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


def starts(n: int) -> list[int]:
    """The pids of the runs of task number ``n`` so far."""
    path = os.environ["PFPROJ_RECORD"]
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [int(p[2]) for p in (line.split() for line in f)
                if p[0] == "start" and p[1] == str(n)]


@worker_process_init.connect
def _child_started(**_: Any) -> None:
    _record(f"init {os.getpid()}")


@worker_process_shutdown.connect
def _child_ending(pid: int, **_: Any) -> None:
    _record(f"down {pid}")


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task
def pid() -> int:
    return os.getpid()


@app.task(soft_time_limit=0.5)
def soft(seconds: float) -> str:
    """Sleep past the soft limit and catch it."""
    try:
        time.sleep(seconds)
    except SoftTimeLimitExceeded:
        return "caught"
    return "slept"


@app.task(time_limit=1.0)
def hard(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"


@app.task
def blocker(n: int, seconds: float) -> int:
    """Record the start (with this child's pid), then sleep."""
    _record(f"start {n} {os.getpid()}")
    time.sleep(seconds)
    return n


@app.task(acks_late=True, reject_on_worker_lost=True)
def requeue_me(n: int) -> str:
    """The first run blocks (the test kills it); the run after the requeue returns."""
    first = not starts(n)
    _record(f"start {n} {os.getpid()}")
    if first:
        time.sleep(60)
    return "again"


@app.task(bind=True, acks_late=True)
def abortable(self: Any, n: int) -> str | None:
    """Run until asked to abort; return why."""
    _record(f"start {n} {os.getpid()}")
    while not self.request.should_abort():
        time.sleep(0.05)
    return self.request.abort_reason


@app.task
async def async_add(x: int, y: int) -> int:
    await asyncio.sleep(0.01)
    return x + y


@app.task(acks_late=True)
async def async_sleeper(n: int) -> str:
    """The first run waits to be cancelled (warm shutdown); the run after the requeue returns."""
    first = not starts(n)
    _record(f"start {n} {os.getpid()}")
    if not first:
        return "second"
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        _record(f"cancelled {n}")
        raise
    return "first"


@app.task
def record_errback(task_id: str) -> None:
    """An errback: called with the failed task's id."""
    _record(f"errback {task_id}")
