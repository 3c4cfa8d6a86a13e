"""The project the fault scenarios run, configured entirely from the environment.

Its one task, ``fproj.work``, records its start and its end (task id, pid, time) in a
store independent of broker and result backend, a SQLite file (``FPROJ_STORE``):
a scenario counts from it what ran, what ran twice and what never finished, whatever
the broker did. A record is written in one autocommit statement before the body
sleeps and after, so a ``kill -9`` keeps every record written before it.

Environment: ``TASKFRAME_BROKER_URL``, ``TASKFRAME_RESULT_BACKEND`` (optional),
``FPROJ_STORE``, ``FPROJ_QUEUE`` (the default queue, unique per run),
``FPROJ_CONF`` (a JSON object of further settings: ``task_acks_late``,
``task_reject_on_worker_lost``, ``broker_transport_options``, ``broker_heartbeat``, ...),
``FPROJ_DEAD_LETTER`` (RabbitMQ: rejected messages go to the queue ``<queue>.dead``).
The test's client configures its own app with ``configure`` too.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import threading
import time
from typing import Any

from taskframe import Taskframe
from taskframe.transport import Queue


def configure(app: Taskframe, queue: str, conf: dict[str, Any], dead_letter: bool) -> None:
    """The settings of a run, the same for its workers and its client."""
    app.conf.task_default_queue = queue
    app.conf.task_ignore_result = True
    app.conf.broker_connection_max_retries = None
    app.conf.update(conf)
    if dead_letter:
        app.conf.task_queues = [Queue(queue, arguments={
            "x-dead-letter-exchange": "", "x-dead-letter-routing-key": f"{queue}.dead"})]


app = Taskframe("fproj")
configure(app, os.environ.get("FPROJ_QUEUE", "fproj"), json.loads(os.environ.get("FPROJ_CONF",
          "{}")), os.environ.get("FPROJ_DEAD_LETTER") == "1")

_local = threading.local()

SCHEMA = "CREATE TABLE IF NOT EXISTS runs (kind TEXT, task_id TEXT, pid INTEGER, at REAL)"


def connect(path: str) -> sqlite3.Connection:
    """A connection to the store: WAL, autocommit, a long busy timeout."""
    db = sqlite3.connect(path, timeout=60, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(SCHEMA)
    return db


def record(kind: str, task_id: str) -> None:
    """Write one record; a connection per thread and process (a fork gets a new one)."""
    db: sqlite3.Connection | None = getattr(_local, "db", None)
    if db is None or getattr(_local, "pid", None) != os.getpid():
        db = _local.db = connect(os.environ["FPROJ_STORE"])
        _local.pid = os.getpid()
    db.execute("INSERT INTO runs VALUES (?, ?, ?, ?)", (kind, task_id, os.getpid(), time.time()))


@app.task(bind=True, name="fproj.work")
def work(self: Any, seconds: float = 0.0) -> None:
    """Record the start, sleep ``seconds``, record the end."""
    record("start", self.request.id)
    time.sleep(seconds)
    record("end", self.request.id)


@app.task(bind=True, name="fproj.escape")
def escape(self: Any, kind: str) -> None:
    """Record the start and the end, then raise a BaseException of the body's own."""
    record("start", self.request.id)
    record("end", self.request.id)  # the body's path ended: the exception is its outcome
    raise SystemExit(3) if kind == "SystemExit" else KeyboardInterrupt()


@app.task(bind=True, name="fproj.cancelled")
async def cancelled(self: Any) -> None:
    """An async body whose own helper is cancelled: its CancelledError is its failure."""
    record("start", self.request.id)
    helper = asyncio.ensure_future(asyncio.sleep(30))
    helper.cancel()
    try:
        await helper
    finally:
        record("end", self.request.id)


def _die() -> None:
    raise RuntimeError("fproj: an exception nobody catches")


@app.task(name="fproj.crash_a_thread")
def crash_a_thread() -> None:
    """Start a thread that dies of an unhandled exception: the harness must see it."""
    thread = threading.Thread(target=_die, name="fproj-crasher")
    thread.start()
    thread.join()


@app.task(bind=True, name="fproj.die_at_start")
def die_at_start(self: Any) -> None:
    """Record the start, then ``kill -9`` this process: the first time only.

    A crash at the body's first instruction: with early acks the ack must already be
    on the wire (issue 14, Why 6), so the task never runs again. The ``doomed`` record
    names the process, for the harness to count the start as interrupted.
    """
    db = connect(os.environ["FPROJ_STORE"])
    try:
        seen = db.execute("SELECT count(*) FROM runs WHERE task_id = ?",
                          (self.request.id,)).fetchone()[0]
    finally:
        db.close()
    record("start", self.request.id)
    if not seen:
        record("doomed", self.request.id)
        os.kill(os.getpid(), signal.SIGKILL)
    record("end", self.request.id)
