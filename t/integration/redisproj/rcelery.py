"""The Celery side of the Redis interop tests: the project of ``rcproj.py``, for Celery 5.7.

Celery's database backend uses SQLAlchemy's psycopg 3 dialect here (``db+postgresql+psycopg``).
"""

from __future__ import annotations

import os

import celery

PREFIX = os.environ.get("RC_PREFIX", "")
BACKEND = os.environ.get("RC_BACKEND", "").replace("db+postgresql://", "db+postgresql+psycopg://")

app = celery.Celery("rcelery", broker=os.environ.get("RC_BROKER"), backend=BACKEND,
                    set_as_current=False)
app.conf.broker_transport_options = {"global_keyprefix": PREFIX}
app.conf.database_table_names = {
    "task": PREFIX.replace(".", "_") + "taskmeta",
    "group": PREFIX.replace(".", "_") + "tasksetmeta",
}
app.conf.worker_hijack_root_logger = False
app.conf.broker_connection_retry_on_startup = True


@app.task(name="rcproj.add")
def add(x: int, y: int) -> int:
    return x + y
