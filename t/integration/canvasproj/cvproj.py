"""The taskframe project of the canvas tests (t/integration/test_canvas_workers.py and
t/interop/test_canvas_celery.py); ``cvcelery.py`` is the same project for Celery.

CV_BROKER, CV_BACKEND (``redis://`` or ``db+postgresql://``), CV_PREFIX (Redis key prefix
and SQL table prefix) and CV_QUEUE (the default queue) come from the environment.
"""

from __future__ import annotations

import os
from typing import Any

import redis

from taskframe import Task, Taskframe

PREFIX = os.environ.get("CV_PREFIX", "")
TABLES = PREFIX.replace(".", "_")

app = Taskframe("cvproj", broker=os.environ.get("CV_BROKER"), backend=os.environ.get("CV_BACKEND"))
app.conf.task_default_queue = os.environ.get("CV_QUEUE", "celery")
app.conf.broker_transport_options = {"global_keyprefix": PREFIX}
app.conf.result_backend_transport_options = {"global_keyprefix": PREFIX}
app.conf.database_table_names = {"task": TABLES + "taskmeta", "group": TABLES + "tasksetmeta",
                                 "counter": TABLES + "counters"}


def _flat(value: Any) -> list[Any]:
    if isinstance(value, list):
        return [leaf for item in value for leaf in _flat(item)]
    return [value]


@app.task(name="cv.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="cv.mul")
def mul(x: int, y: int) -> int:
    return x * y


@app.task(name="cv.tsum")
def tsum(values: list[Any]) -> int:
    return sum(_flat(values))


@app.task(name="cv.ident")
def ident(value: Any) -> Any:
    return value


@app.task(name="cv.boom")
def boom(*args: Any) -> None:
    raise ValueError("boom")


@app.task(name="cv.note_error")
def note_error(request: Any, exc: BaseException, traceback: str) -> None:
    """An errback: counts its calls under CV_PREFIX + ``errors:<failed id>``."""
    client = redis.Redis.from_url(os.environ["CV_REDIS"])
    client.rpush(f"{PREFIX}errors", f"{request.id} {type(exc).__name__}")
    client.close()


@app.task(name="cv.count_body")
def count_body(values: list[Any], key: str = "body-runs") -> list[int]:
    """A chord body that counts its runs in Redis under ``key``: [runs so far, len, sum]."""
    client = redis.Redis.from_url(os.environ["CV_REDIS"])
    runs = int(client.incr(f"{PREFIX}{key}"))
    client.close()
    return [runs, len(values), sum(values)]


@app.task(name="cv.replacer", bind=True)
def replacer(self: Task[Any, Any], x: int) -> None:
    self.replace(add.s(x, 100) | mul.s(2))
