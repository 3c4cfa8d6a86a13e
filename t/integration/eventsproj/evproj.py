"""A taskframe project for event tests, configured from the environment.

``stall_loop(seconds)`` blocks the worker's consumer loop itself for that long (from a
``task_received`` receiver, which runs in the loop), as a stuck hook would: the health
check must notice.

EVPROJ_BROKER: broker URL; EVPROJ_EXCHANGE: the events exchange (unique per test, so
events of other tests' workers stay out); EVPROJ_QUEUE: the task queue.
"""

from __future__ import annotations

import os
import time
from typing import Any

from taskframe import Taskframe, signals

app = Taskframe("evproj")
app.conf.broker_url = os.environ["EVPROJ_BROKER"]
app.conf.event_exchange = os.environ.get("EVPROJ_EXCHANGE", "celeryev")
app.conf.task_default_queue = os.environ.get("EVPROJ_QUEUE", "celery")
app.conf.task_ignore_result = True


@app.task(name="evproj.add")
def add(x: int, y: int) -> int:
    """Add two numbers."""
    return x + y


@app.task(name="evproj.fail")
def fail(message: str) -> None:
    """Raise ``ValueError(message)``."""
    raise ValueError(message)


@app.task(name="evproj.sleep")
def sleep(seconds: float) -> float:
    """Sleep, then return the seconds slept."""
    time.sleep(seconds)
    return seconds


@app.task(name="evproj.stall_loop")
def stall_loop(seconds: float) -> float:
    """Nothing: its ``task_received`` receiver below is what blocks the loop."""
    return seconds


@signals.task_received.connect
def _stall(sender: Any = None, request: Any = None, **_: Any) -> None:
    if request is not None and request.task == "evproj.stall_loop":
        time.sleep(float(request.args[0]))
