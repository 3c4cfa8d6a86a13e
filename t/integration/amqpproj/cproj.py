"""The Celery twin of ``aproj``: the same queues, task names and result tables.

Configured from the same environment variables as ``aproj`` (see its docstring).
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from kombu import Exchange, Queue

PREFIX = os.environ.get("APROJ_PREFIX", "aproj_")


def queues_from(spec: str) -> list[Queue]:
    """kombu queues declared exactly as ``aproj`` declares its own."""
    queues = []
    for item in filter(None, spec.split(",")):
        name, _, kind = item.partition(":")
        if kind == "quorum-topic":
            queues.append(Queue(name, Exchange(name, type="topic"), routing_key=name,
                                queue_arguments={"x-queue-type": "quorum"}))
        elif kind == "quorum":
            queues.append(Queue(name, queue_arguments={"x-queue-type": "quorum"}))
        else:
            queues.append(Queue(name))
    return queues


app = Celery("cproj", broker=os.environ["TASKFRAME_BROKER_URL"],
             backend=os.environ.get("TASKFRAME_RESULT_BACKEND") or None)
_queues = queues_from(os.environ.get("APROJ_QUEUES", ""))
if _queues:
    app.conf.task_queues = _queues
    app.conf.task_default_queue = _queues[0].name
app.conf.database_table_names = {
    "task": f"{PREFIX}celery_taskmeta",
    "group": f"{PREFIX}celery_tasksetmeta",
}
app.conf.broker_connection_retry_on_startup = True
app.conf.worker_hijack_root_logger = False
# The broker is shared with other tests: stay off the fixed-name pidbox and event exchanges.
app.conf.worker_enable_remote_control = False
app.conf.worker_send_task_events = False


@app.task(bind=True, name="interop.add")
def add(self: Any, x: int, y: int) -> dict[str, Any]:
    """The sum, and the exchange the message came through (the delay ladder or not)."""
    return {"sum": x + y, "exchange": self.request.delivery_info.get("exchange"),
            "by": "celery"}
