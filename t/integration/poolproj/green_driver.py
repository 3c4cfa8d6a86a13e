"""Drives a gevent or eventlet pool directly (no broker), in a subprocess of its own.

``python green_driver.py gevent|eventlet`` monkey-patches as the CLI does, runs jobs through
the pool's interface (submit, terminate, abort, stop) and prints one JSON object: the
outcome of each job, by name.
"""

from __future__ import annotations

import sys

from taskframe.cli.bootstrap import monkey_patch

POOL = sys.argv[1]
monkey_patch(POOL)

import json  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from typing import Any  # noqa: E402

from taskframe import Task, Taskframe  # noqa: E402
from taskframe.context import Context  # noqa: E402
from taskframe.execution.outcome import Outcome  # noqa: E402
from taskframe.pools import POOLS  # noqa: E402
from taskframe.pools.base import TaskJob  # noqa: E402

app = Taskframe("driver", broker="memory://", backend="memory://", set_as_current=False)


@app.task(name="driver.sleep")
def sleep(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"


@app.task(name="driver.until_abort", bind=True)
def until_abort(self: Task[Any, Any]) -> str | None:
    while not self.request.should_abort():
        time.sleep(0.01)
    return self.request.abort_reason


outcomes: dict[str, Any] = {}


def job(name: str, task: Task[Any, Any], *args: Any) -> TaskJob:
    def done(job: TaskJob, outcome: Outcome) -> None:
        assert name not in outcomes, f"{name} reported twice"
        outcomes[name] = {"state": outcome.state, "value": repr(outcome.retval),
                          "stored": app.backend.get_task_meta(job.id)["status"]}

    ctx = Context(id=str(uuid.uuid4()), task=task.name, args=list(args), called_directly=False)
    return TaskJob(task=task, context=ctx, store=True, on_accepted=lambda job: None,
                   on_done=done)


def wait_for(*names: str) -> None:
    deadline = time.monotonic() + 10
    while not all(n in outcomes for n in names) and time.monotonic() < deadline:
        time.sleep(0.01)


pool = POOLS[POOL](4, app=app)
pool.start()
running, aborted, finishing = job("running", sleep, 30), job("aborted", until_abort), \
    job("finishing", sleep, 0.05)
for j in (running, aborted, finishing):
    pool.submit(j)
time.sleep(0.2)
outcomes["terminate_returned"] = pool.terminate(running)
pool.abort(aborted, "shutdown")
wait_for("running", "aborted", "finishing")
not_started = job("not_started", sleep, 30)
pool.submit(not_started)
outcomes["terminate_not_started"] = pool.terminate(not_started)  # before it got to run
wait_for("not_started")
outcomes["active_after"] = pool.active
stopped = job("stopped", sleep, 30)
pool.submit(stopped)
time.sleep(0.1)
pool.stop(wait=True, timeout=0.2)
time.sleep(0.1)
outcomes["active_after_stop"] = pool.active
print(json.dumps(outcomes))
