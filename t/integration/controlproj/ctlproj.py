"""The remote-control test project (taskframe side), configured from environment variables.

``CTL_BROKER``, ``CTL_BACKEND`` (optional), ``CTL_NS`` (``control_exchange``: one per test, so
workers of other tests never answer), ``CTL_QUEUE`` (the task queue), ``CTL_RECORD`` (a file
each run of ``record`` appends its argument to); optional ``CTL_REVOKED_EXPIRES`` and
``CTL_SYNC_INTERVAL`` (``worker_revoked_expires``, ``worker_revoked_sync_interval``).
"""

from __future__ import annotations

import os
import time
from typing import Any

from taskframe import Taskframe

app = Taskframe("ctlproj", broker=os.environ["CTL_BROKER"],
                backend=os.environ.get("CTL_BACKEND") or None)
app.conf.update(
    control_exchange=os.environ.get("CTL_NS", "celery"),
    task_default_queue=os.environ.get("CTL_QUEUE", "celery"),
    worker_prefetch_multiplier=1,
    worker_revoked_expires=float(os.environ.get("CTL_REVOKED_EXPIRES", 10800.0)),
    worker_revoked_sync_interval=float(os.environ.get("CTL_SYNC_INTERVAL", 10.0)),
)


@app.task(name="ctl.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="ctl.sleep", bind=True)
def sleep(self: Any, seconds: float) -> str:
    """Sleep, checking ``should_abort()`` (how threads/solo tasks see terminate)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if self.request.should_abort():
            return f"aborted: {self.request.abort_reason}"
        time.sleep(0.05)
    return "slept"


@app.task(name="ctl.record")
def record(value: str) -> str:
    with open(os.environ["CTL_RECORD"], "a", encoding="utf-8") as fh:
        fh.write(value + "\n")
    return value


@app.task(name="ctl.asleep")
async def asleep(seconds: float) -> str:
    """A coroutine task (the asyncio pool cancels it on terminate)."""
    import asyncio

    await asyncio.sleep(seconds)
    return "slept"
