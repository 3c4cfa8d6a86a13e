"""A project for the prefork pool tests, configured from the environment.

TASKFRAME_BROKER_URL / TASKFRAME_RESULT_BACKEND pick the servers; PFPROJ_RECORD names a file
that children and tasks append one line to (``init <pid>``, ``down <pid>``, ``start <n> <pid>``).
PFPROJ_QUEUE names the task queue (``celery``); with PFPROJ_HOLD_LOCK=1 the worker's main
thread takes ``HELD`` once the worker is ready, and keeps it.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

from taskframe import Taskframe
from taskframe.errors import SoftTimeLimitExceeded
from taskframe.pools import _prefork_zygote
from taskframe.signals import worker_process_init, worker_process_shutdown, worker_ready

app = Taskframe("pfproj")
app.conf.task_default_queue = os.environ.get("PFPROJ_QUEUE", "celery")

#: Held by the running worker (PFPROJ_HOLD_LOCK=1): a process forked from the worker from then
#: on inherits it held by a thread it does not have, and can never take it.
HELD = threading.Lock()


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


@worker_ready.connect
def _hold_the_lock(**_: Any) -> None:
    if os.environ.get("PFPROJ_HOLD_LOCK") == "1":
        HELD.acquire()


@app.task
def lineage() -> dict[str, Any]:
    """Where this child comes from: its pid, its fork server's (its parent's), how many threads
    the process that forked that server ran at that instant, and whether ``HELD`` is free."""
    free = HELD.acquire(timeout=2.0)
    if free:
        HELD.release()
    return {"pid": os.getpid(), "server": os.getppid(),
            "threads": _prefork_zygote.forked_from_threads, "lock_free": free}


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
