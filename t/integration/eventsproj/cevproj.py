"""The Celery twin of ``evproj``: same environment variables, same task names."""

from __future__ import annotations

import os

from celery import Celery

app = Celery("cevproj", broker=os.environ["EVPROJ_BROKER"])
app.conf.event_exchange = os.environ.get("EVPROJ_EXCHANGE", "celeryev")
app.conf.task_default_queue = os.environ.get("EVPROJ_QUEUE", "celery")
app.conf.task_ignore_result = True
app.conf.broker_connection_retry_on_startup = True


@app.task(name="evproj.add")
def add(x: int, y: int) -> int:
    """Add two numbers."""
    return x + y
