"""A project for worker-process tests: configured entirely from the environment.

TASKFRAME_BROKER_URL / TASKFRAME_RESULT_BACKEND pick the servers; WPROJ_RECORD names a file
that every task run appends one line to (O_APPEND writes of one line are atomic), so a test
can count how many times each task ran.
"""

from __future__ import annotations

import os
import time

from taskframe import Taskframe

app = Taskframe("wproj")
app.conf.broker_transport_options = {
    "visibility_timeout": float(os.environ.get("WPROJ_VISIBILITY_TIMEOUT", "60")),
    "table_prefix": os.environ.get("WPROJ_TABLE_PREFIX", "taskframe_"),
}
app.conf.database_table_names = {
    "task": os.environ.get("WPROJ_TABLE_PREFIX", "") + "celery_taskmeta",
    "group": os.environ.get("WPROJ_TABLE_PREFIX", "") + "celery_tasksetmeta",
}


def _record(line: str) -> None:
    fd = os.open(os.environ["WPROJ_RECORD"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


@app.task(ignore_result=True)
def record(n: int) -> int:
    """Append ``n`` and this worker's pid to the record file."""
    _record(f"{n} {os.getpid()}")
    return n


@app.task(acks_late=True)
def slow_record(n: int, seconds: float) -> int:
    """Record that it started, sleep, record that it finished."""
    _record(f"start {n} {os.getpid()}")
    time.sleep(seconds)
    _record(f"end {n} {os.getpid()}")
    return n
