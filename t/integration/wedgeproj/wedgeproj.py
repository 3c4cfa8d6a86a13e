"""A project for the watchdog tests: tasks that keep a pool busy, and tasks that wedge it.

WEDGEPROJ_BROKER names the Redis broker, WEDGEPROJ_PREFIX its key prefix (and the queue's
name), WEDGEPROJ_RECORD a file each run appends ``start n`` / ``end n`` lines to.

``block`` is the classic way to wedge an asyncio worker: an ``async def`` task that calls a
blocking function, so the event loop, and every other task on it, stops. ``stall_loop``
blocks the consumer loop itself (from a ``task_received`` receiver, which runs in the loop),
as a stuck hook would.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from taskframe import Taskframe, signals

PREFIX = os.environ.get("WEDGEPROJ_PREFIX", "")

app = Taskframe("wedgeproj", broker=os.environ.get("WEDGEPROJ_BROKER"))
app.conf.broker_transport_options = {"global_keyprefix": PREFIX}
app.conf.task_default_queue = f"{PREFIX}tasks"
app.conf.control_exchange = f"{PREFIX}ctl"  # this test's workers only
app.conf.task_ignore_result = True
app.conf.worker_prefetch_multiplier = 1


def record(*words: object) -> None:
    """Append one line (atomic for short O_APPEND writes)."""
    fd = os.open(os.environ["WEDGEPROJ_RECORD"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (" ".join(str(w) for w in words) + "\n").encode())
    finally:
        os.close(fd)


@app.task(name="wedgeproj.nap")
def nap(n: int, seconds: float) -> int:
    """A task that runs ``seconds`` (a long one is work, not a wedge)."""
    record("start", n)
    time.sleep(seconds)
    record("end", n)
    return n


@app.task(name="wedgeproj.nap_limited", time_limit=1.0)
def nap_limited(n: int, seconds: float) -> int:
    """As ``nap``, with a hard time limit that threads and solo cannot enforce."""
    return nap(n, seconds)


@app.task(name="wedgeproj.anap")
async def anap(n: int, seconds: float) -> int:
    """An ``async def`` task that awaits ``seconds`` (the loop goes on meanwhile)."""
    record("start", n)
    await asyncio.sleep(seconds)
    record("end", n)
    return n


@app.task(name="wedgeproj.block")
async def block(n: int, seconds: float) -> int:
    """An ``async def`` task that blocks its event loop for ``seconds``."""
    record("start", n)
    time.sleep(seconds)
    record("end", n)
    return n


@app.task(name="wedgeproj.block_limited", time_limit=1.0)
async def block_limited(n: int, seconds: float) -> int:
    """As ``block``, with a hard time limit the blocked loop cannot enforce."""
    record("start", n)
    time.sleep(seconds)
    record("end", n)
    return n


@app.task(name="wedgeproj.stall_loop")
def stall_loop(seconds: float) -> float:
    """Nothing: its ``task_received`` receiver below is what blocks the loop."""
    return seconds


@signals.task_received.connect
def _stall(sender: Any = None, request: Any = None, **_: Any) -> None:
    if request is not None and request.task == "wedgeproj.stall_loop":
        record("stalling")
        time.sleep(float(request.args[0]))
