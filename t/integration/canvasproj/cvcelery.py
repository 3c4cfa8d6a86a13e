"""The Celery 5.7 side of the canvas interop test: ``cvproj.py`` written for Celery."""

from __future__ import annotations

import os
from typing import Any

import celery

PREFIX = os.environ.get("CV_PREFIX", "")
TABLES = PREFIX.replace(".", "_")
# Celery's database backend reaches PostgreSQL through SQLAlchemy's psycopg 3 dialect.
BACKEND = os.environ.get("CV_BACKEND", "").replace("db+postgresql://", "db+postgresql+psycopg://")

app = celery.Celery("cvcelery", broker=os.environ.get("CV_BROKER"), backend=BACKEND,
                    set_as_current=False)
app.conf.database_table_names = {"task": TABLES + "taskmeta", "group": TABLES + "tasksetmeta"}
app.conf.task_default_queue = os.environ.get("CV_QUEUE", "celery")
app.conf.broker_transport_options = {"global_keyprefix": PREFIX}
app.conf.result_backend_transport_options = {"global_keyprefix": PREFIX}
app.conf.worker_hijack_root_logger = False
app.conf.broker_connection_retry_on_startup = True


def _flat(value: Any) -> list[Any]:
    if isinstance(value, list):
        return [leaf for item in value for leaf in _flat(item)]
    return [value]


@app.task(name="cv.add", shared=False)
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="cv.mul", shared=False)
def mul(x: int, y: int) -> int:
    return x * y


@app.task(name="cv.tsum", shared=False)
def tsum(values: list[Any]) -> int:
    return sum(_flat(values))


@app.task(name="cv.ident", shared=False)
def ident(value: Any) -> Any:
    return value


@app.task(name="cv.boom", shared=False)
def boom(*args: Any) -> None:
    raise ValueError("boom")


@app.task(name="cv.count_body", shared=False)
def count_body(values: list[Any], key: str = "body-runs") -> list[int]:
    """A chord body that counts its runs in Redis under ``key``: [runs so far, len, sum]."""
    import redis

    client = redis.Redis.from_url(os.environ["CV_REDIS"])
    runs = int(client.incr(f"{PREFIX}{key}"))
    client.close()
    return [runs, len(values), sum(values)]
