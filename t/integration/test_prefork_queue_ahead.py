"""Jobs the prefork pool holds for its next free child (``queue_ahead``) stay revocable.

A ``taskframe worker -P prefork -c 1`` on Redis (``preforkproj/pfproj.py``) runs a
blocking task; the next one waits in the pool for the child. Revoked meanwhile, it is
taken back and discarded before it runs, as a task still reserved by the consumer is.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from services import redis_delete_prefix, redis_url
from workers import ProjectImport, WorkerProcs, wait_until

from taskframe import states

PROJ_DIR = Path(__file__).parent / "preforkproj"


class RedisFleet:
    """``pfproj`` on Redis: the client here, one prefork worker on a queue of its own."""

    def __init__(self, tmp_path: Path) -> None:
        self.queue = f"tf-qahead-{uuid.uuid4().hex[:8]}"
        self.node = f"qahead-{uuid.uuid4().hex[:8]}@localhost"
        env = {"TASKFRAME_BROKER_URL": redis_url(), "TASKFRAME_RESULT_BACKEND": redis_url(),
               "PFPROJ_RECORD": str(tmp_path / "record.txt")}
        self.project = ProjectImport(PROJ_DIR, "pfproj", env)
        self.workers = WorkerProcs(PROJ_DIR, "pfproj", env, tmp_path)

    def close(self) -> None:
        self.workers.stop()
        self.project.close()
        redis_delete_prefix(0, self.queue)


@pytest.fixture()
def fleet(tmp_path: Path) -> Iterator[RedisFleet]:
    fleet = RedisFleet(tmp_path)
    try:
        yield fleet
    finally:
        fleet.close()


def test_a_job_waiting_in_the_pool_is_revoked_before_it_runs(fleet: RedisFleet) -> None:
    mod = fleet.project.module
    fleet.workers.start("-P", "prefork", "-c", "1", "-Q", fleet.queue, "-n", fleet.node)
    assert mod.add.apply_async((1, 1), queue=fleet.queue).get(timeout=30) == 2, \
        fleet.workers.log_text()
    first = mod.blocker.apply_async((1, 2.0), queue=fleet.queue)
    second = mod.blocker.apply_async((2, 0.0), queue=fleet.queue)
    wait_until(lambda: mod.starts(1), 30, "the first task to start")
    # Held by the pool for the busy child: reserved, not active (as Celery reports it).
    inspect = mod.app.control.inspect(destination=[fleet.node], timeout=10)
    assert [r["id"] for r in inspect.active()[fleet.node]] == [first.id]
    assert second.id in [r["id"] for r in inspect.reserved()[fleet.node]]
    mod.app.control.revoke(second.id, destination=[fleet.node])
    assert first.get(timeout=30) == 1
    wait_until(lambda: second.state == states.REVOKED, 30, "the second task to be revoked")
    assert mod.starts(2) == [], fleet.workers.log_text()
