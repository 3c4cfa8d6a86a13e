"""A project for worker-process tests on Redis (and SQL): configured from the environment.

TASKFRAME_BROKER_URL picks the server (tasks ignore results); RPROJ_PREFIX is the Redis
``global_keyprefix``, RPROJ_TABLE_PREFIX the SQL transport's table prefix,
RPROJ_VISIBILITY_TIMEOUT the visibility timeout, RPROJ_SOCKET_TIMEOUT the socket timeout
(5 s); RPROJ_RECORD names a file that every task run appends one line to (O_APPEND
writes of one line are atomic), so a test can count how often each task ran.
"""

from __future__ import annotations

import os
import time

from taskframe import Taskframe

app = Taskframe("rproj")
app.conf.broker_transport_options = {
    "visibility_timeout": float(os.environ.get("RPROJ_VISIBILITY_TIMEOUT", "60")),
    "global_keyprefix": os.environ.get("RPROJ_PREFIX", ""),
    "socket_timeout": float(os.environ.get("RPROJ_SOCKET_TIMEOUT", "5")),
    "table_prefix": os.environ.get("RPROJ_TABLE_PREFIX", "taskframe_"),  # the SQL transport
}
app.conf.broker_connection_max_retries = None


def _record(line: str) -> None:
    fd = os.open(os.environ["RPROJ_RECORD"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


@app.task(ignore_result=True)
def record(n: int) -> int:
    """Append ``n`` and this worker's pid to the record file."""
    _record(f"{n} {os.getpid()}")
    return n


@app.task(acks_late=True, ignore_result=True)
def slow_record(n: int, seconds: float) -> int:
    """Record that it started, sleep, record that it finished."""
    _record(f"start {n} {os.getpid()}")
    time.sleep(seconds)
    _record(f"end {n} {os.getpid()}")
    return n


@app.task
def plain(n: int) -> int:
    """Record ``n``; its result goes to the result backend when one is set."""
    _record(f"{n} {os.getpid()}")
    return n
