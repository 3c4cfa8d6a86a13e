"""An early ack reaches the broker before the task's body starts (issue 14, Why 6).

Early acks promise that a task runs at most once: if the worker dies, or its link drops,
once the body has started, the broker must not hand the message out again. So when the
body's first line runs, the broker no longer holds the message. Here the body looks for
its own message among the ones the Redis broker still holds (kombu's ``unacked`` hash):
before the fix the acks waited in a batch for the loop's next poll, and most bodies found
theirs there. The fault suite (``t/faults/test_kill.py``, ``test_link.py``,
``test_restart.py``) shows the same with real crashes, cuts and restarts.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest
import redis
from services import redis_delete_prefix, redis_url
from workers import InlineWorkers, wait_until

from taskframe import Taskframe


@pytest.fixture
def prefix() -> Iterator[str]:
    prefix = f"early-{uuid.uuid4().hex[:8]}."
    yield prefix
    redis_delete_prefix(0, prefix)


@pytest.mark.parametrize(("pool", "concurrency"), [("solo", 1), ("threads", 4)])
def test_the_broker_no_longer_holds_an_early_ack_message_when_its_body_starts(
        prefix: str, pool: str, concurrency: int) -> None:
    url = redis_url()
    app = Taskframe("early", broker=url, set_as_current=False)
    app.conf.broker_transport_options = {"global_keyprefix": prefix}
    app.conf.task_acks_late = False
    admin = redis.Redis.from_url(url)
    seen: dict[str, bool] = {}
    lock = threading.Lock()

    @app.task(name="early.look")
    def look() -> None:
        held = admin.hvals(f"{prefix}unacked")
        task_id = str(look.request.id)
        with lock:
            seen[task_id] = any(task_id.encode() in value for value in held)

    sent = [look.apply_async(ignore_result=True).id for _ in range(40)]
    workers = InlineWorkers(app, pool=pool, concurrency=concurrency, prefetch_multiplier=4)
    try:
        workers.start()
        wait_until(lambda: len(seen) == len(sent), 60, "every task to run")
    finally:
        workers.stop_all()
        admin.close()
        app.close()
    still_held = sorted(task_id for task_id, held in seen.items() if held)
    assert still_held == [], f"{len(still_held)} of {len(sent)} bodies started before their ack"
    assert sorted(seen) == sorted(sent)
