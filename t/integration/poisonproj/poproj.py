"""A project for the delivery-limit tests (poison messages), configured from the environment.

TASKFRAME_BROKER_URL / TASKFRAME_RESULT_BACKEND pick the servers; POPROJ_QUEUE names the one
queue (POPROJ_QUEUE_TYPE: classic or quorum), POPROJ_LIMIT is ``worker_delivery_limit``,
POPROJ_OPTIONS the broker transport options (JSON). POPROJ_RECORD names a file that every
run appends ``start <n> <pid>`` to (O_APPEND writes of one line are atomic), so a test can
count the runs of each task across worker processes and their children.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

from taskframe import Taskframe
from taskframe.errors import Reject
from taskframe.transport import Queue

app = Taskframe("poproj")
QUEUE = os.environ.get("POPROJ_QUEUE", "poison")
app.conf.task_queues = [Queue(QUEUE, queue_type=os.environ.get(  # type: ignore[arg-type]
    "POPROJ_QUEUE_TYPE", "classic"))]
app.conf.task_default_queue = QUEUE
app.conf.worker_delivery_limit = int(os.environ.get("POPROJ_LIMIT", "3")) or None
app.conf.broker_transport_options = json.loads(os.environ.get("POPROJ_OPTIONS", "{}"))
app.conf.worker_soft_shutdown_timeout = 0.5  # then running tasks are asked to abort
app.conf.database_table_names = {
    "task": os.environ.get("POPROJ_PREFIX", "") + "celery_taskmeta",
    "group": os.environ.get("POPROJ_PREFIX", "") + "celery_tasksetmeta",
}


def _record(line: str) -> None:
    fd = os.open(os.environ["POPROJ_RECORD"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


def starts(n: int) -> list[int]:
    """The pids of the runs of task number ``n`` so far."""
    path = os.environ["POPROJ_RECORD"]
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [int(p[2]) for p in (line.split() for line in f)
                if p[0] == "start" and p[1] == str(n)]


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task(acks_late=True, reject_on_worker_lost=True)
def crash(n: int) -> None:
    """Kill the process running it (a prefork child: the worker requeues the message)."""
    _record(f"start {n} {os.getpid()}")
    os.kill(os.getpid(), signal.SIGKILL)


@app.task(acks_late=True)
def hold(n: int) -> int:
    """Hold the message while the test kills the worker."""
    _record(f"start {n} {os.getpid()}")
    time.sleep(120)
    return n


@app.task(bind=True, acks_late=True)
def patient(self: Any, n: int) -> int:
    """Return once the release file exists; asked to abort before that (a warm shutdown),
    give the message back with the task's own ``Reject(requeue=True)``."""
    _record(f"start {n} {os.getpid()}")
    while not os.path.exists(os.environ["POPROJ_RECORD"] + ".release"):
        if self.request.should_abort():
            raise Reject("shutting down", requeue=True)
        time.sleep(0.05)
    return n


@app.task
def collect(values: list[Any]) -> list[Any]:
    return values
