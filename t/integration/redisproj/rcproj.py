"""The taskframe side of the Redis interop tests (t/interop/test_redis_celery.py).

RC_BROKER, RC_PREFIX (Redis ``global_keyprefix`` and result-table prefix) and RC_BACKEND
(a ``db+postgresql://`` URL) come from the environment; ``rcelery.py`` is the same
project written for Celery, with the same task names.
"""

from __future__ import annotations

import os

from taskframe import Taskframe

PREFIX = os.environ.get("RC_PREFIX", "")

app = Taskframe("rcproj", broker=os.environ.get("RC_BROKER"), backend=os.environ.get("RC_BACKEND"))
app.conf.broker_transport_options = {"global_keyprefix": PREFIX}
app.conf.database_table_names = {
    "task": PREFIX.replace(".", "_") + "taskmeta",
    "group": PREFIX.replace(".", "_") + "tasksetmeta",
}


@app.task(name="rcproj.add")
def add(x: int, y: int) -> int:
    return x + y
