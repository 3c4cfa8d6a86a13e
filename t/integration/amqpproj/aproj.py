"""A taskframe project for the AMQP worker tests, configured from the environment.

TASKFRAME_BROKER_URL / TASKFRAME_RESULT_BACKEND pick the servers.
APROJ_QUEUES: comma-separated ``name:kind`` with kind ``classic``, ``quorum`` (direct
exchange) or ``quorum-topic`` (a topic exchange named like the queue, the shape
Celery's native delayed delivery needs). The first queue is the default queue.
APROJ_PREFIX: names the result tables and the broker connections (``client_name``).
APROJ_RECORD: a file every ``record`` run appends one line to.
"""

from __future__ import annotations

import os
import time
from typing import Any

from taskframe import Taskframe
from taskframe.transport import Exchange, Queue

PREFIX = os.environ.get("APROJ_PREFIX", "aproj_")


def queues_from(spec: str) -> list[Queue]:
    """Queues from ``APROJ_QUEUES``-style text."""
    queues = []
    for item in filter(None, spec.split(",")):
        name, _, kind = item.partition(":")
        if kind == "quorum-topic":
            queues.append(Queue(name, Exchange(name, "topic"), name, queue_type="quorum"))
        else:
            queues.append(Queue(name, queue_type="quorum" if kind == "quorum" else "classic"))
    return queues


app = Taskframe("aproj")
app.conf.broker_url = os.environ["TASKFRAME_BROKER_URL"]
app.conf.result_backend = os.environ.get("TASKFRAME_RESULT_BACKEND") or None
_queues = queues_from(os.environ.get("APROJ_QUEUES", ""))
if _queues:
    app.conf.task_queues = _queues
    app.conf.task_default_queue = _queues[0].name
app.conf.broker_transport_options = {"client_name": f"{PREFIX}-conn"}
app.conf.broker_connection_max_retries = int(os.environ.get("APROJ_MAX_RETRIES", "100"))
app.conf.database_table_names = {
    "task": f"{PREFIX}celery_taskmeta",
    "group": f"{PREFIX}celery_tasksetmeta",
}


def _record(line: str) -> None:
    fd = os.open(os.environ["APROJ_RECORD"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


@app.task(bind=True, ignore_result=True, name="aproj.record")
def record(self: Any, n: int, pause: float = 0.0) -> int:
    """Append ``n``, this worker's pid and whether the broker redelivered it."""
    if pause:
        time.sleep(pause)
    _record(f"{n} {os.getpid()} {int(bool(self.request.delivery_info.get('redelivered')))}")
    return n


@app.task(bind=True, name="interop.add")
def add(self: Any, x: int, y: int) -> dict[str, Any]:
    """The sum, and the exchange the message came through (the delay ladder or not)."""
    return {"sum": x + y, "exchange": self.request.delivery_info.get("exchange"),
            "by": "taskframe"}
