"""The demo project: three tasks on the embedded SQLite default (no server needed)."""

from __future__ import annotations

from taskframe import Taskframe

# No broker_url: taskframe uses ./taskframe.sqlite3 for messages and results.
app = Taskframe("proj")


@app.task
def add(x: int, y: int) -> int:
    """Add two numbers."""
    return x + y


@app.task(bind=True, max_retries=5, default_retry_delay=0.5)
def flaky(self, succeed_on: int) -> str:  # type: ignore[no-untyped-def]
    """Fail until the ``succeed_on``-th retry, then succeed."""
    if self.request.retries < succeed_on:
        raise self.retry(exc=ConnectionError("service unavailable"))
    return f"succeeded after {self.request.retries} retries"


@app.task
def divide(x: float, y: float) -> float:
    """Divide; fails with ZeroDivisionError when y is 0."""
    return x / y
