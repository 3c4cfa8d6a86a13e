"""Celery 5.7's RedisBackend and ours share keys and pub/sub channels, in both directions."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import celery
import pytest
import redis
import services

from taskframe import states
from taskframe.backends import BackendOptions, create_backend
from taskframe.backends.base import Backend
from taskframe.protocol import decode_result, group_tuple, result_tuple

pytestmark = [pytest.mark.interop, pytest.mark.redis]
DB = 11


@pytest.fixture
def prefix() -> Iterator[str]:
    name = f"tf-rci-{uuid.uuid4().hex[:10]}"  # no separator: both add "_"
    yield name
    services.redis_delete_prefix(DB, name)


@pytest.fixture
def app(prefix: str) -> Iterator[celery.Celery]:
    capp = celery.Celery("interop-redis", broker="memory://", backend=services.redis_url(DB),
                         set_as_current=False)
    capp.conf.result_backend_transport_options = {"global_keyprefix": prefix}
    yield capp
    capp.close()


@pytest.fixture
def ours(prefix: str) -> Iterator[Backend]:
    backend = create_backend(services.redis_url(DB), BackendOptions(
        transport_options={"global_keyprefix": prefix}))
    yield backend
    backend.close()


def test_celery_reads_what_we_wrote(app: celery.Celery, ours: Backend) -> None:
    ours.mark_as_done("ok-1", {"a": [1, 2], "b": None})
    ours.mark_as_failure("bad-1", ValueError("boom", 42), traceback="Traceback (most recent)")
    ours.mark_as_revoked("rev-1", "expired")
    ours.save_group("g-ours", group_tuple("g-ours", [result_tuple("ok-1"),
                                                     result_tuple("bad-1")]))
    assert app.AsyncResult("ok-1").get(timeout=10) == {"a": [1, 2], "b": None}
    failed = app.AsyncResult("bad-1")
    assert failed.state == "FAILURE" and failed.traceback == "Traceback (most recent)"
    exc = failed.get(timeout=10, propagate=False)
    assert type(exc) is ValueError and exc.args == ("boom", 42)
    revoked = app.AsyncResult("rev-1").get(timeout=10, propagate=False)
    assert type(revoked) is celery.exceptions.TaskRevokedError and revoked.args == ("expired",)
    restored = app.GroupResult.restore("g-ours", app=app)
    assert restored is not None and [r.id for r in restored.results] == ["ok-1", "bad-1"]
    assert app.backend.get_task_meta("unknown")["status"] == "PENDING"


def test_we_read_what_celery_wrote(app: celery.Celery, ours: Backend) -> None:
    app.backend.store_result("ok-2", [3, "x"], "SUCCESS")
    app.backend.mark_as_failure("bad-2", KeyError("k"), traceback="tb text")
    app.backend.mark_as_retry("retry-2", celery.exceptions.Retry("again"))
    app.GroupResult("g-celery", [app.AsyncResult("c"), app.AsyncResult("d")]).save(
        backend=app.backend)
    meta = ours.get_task_meta("ok-2")
    assert meta["status"] == states.SUCCESS and decode_result(meta) == [3, "x"]
    failed = ours.get_task_meta("bad-2")
    assert failed["traceback"] == "tb text"
    exc = decode_result(failed)
    assert type(exc) is KeyError and exc.args == ("k",)
    assert type(decode_result(ours.get_task_meta("retry-2"))).__name__ == "Retry"
    assert ours.restore_group("g-celery") == group_tuple(
        "g-celery", [result_tuple("c"), result_tuple("d")])
    # A SUCCESS Celery stored is never replaced by ours.
    kept = ours.mark_as_failure("ok-2", RuntimeError("duplicate run"))
    assert kept["status"] == states.SUCCESS and kept["result"] == [3, "x"]


def _subscribers(channel: str) -> int:
    client = redis.Redis(host="127.0.0.1", port=6379, db=DB)
    try:
        return int(client.pubsub_numsub(channel)[0][1])
    finally:
        client.close()


def test_celery_get_wakes_on_our_publish(app: celery.Celery, ours: Backend) -> None:
    task_id = str(uuid.uuid4())
    ours.mark_as_started(task_id)
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(app.AsyncResult(task_id).get(timeout=60)))
    waiter.start()
    channel = app.backend.get_key_for_task(task_id).decode()
    for _ in range(3000):  # until Celery's result consumer has subscribed
        if _subscribers(channel):
            break
        time.sleep(0.01)
    assert _subscribers(channel) == 1, "Celery never subscribed to the task's channel"
    ours.mark_as_done(task_id, "pushed")
    waiter.join(60)
    assert got == ["pushed"]


def test_our_wait_wakes_on_celerys_publish(app: celery.Celery, ours: Backend) -> None:
    task_id = str(uuid.uuid4())
    app.backend.store_result(task_id, None, "STARTED")
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(ours.wait_for(task_id, timeout=60)))
    waiter.start()
    channel = app.backend.get_key_for_task(task_id).decode()
    for _ in range(3000):
        if _subscribers(channel):
            break
        time.sleep(0.01)
    assert _subscribers(channel) == 1, "our waiter never subscribed"
    app.backend.store_result(task_id, 9, "SUCCESS")
    waiter.join(60)
    assert got and got[0]["status"] == states.SUCCESS and got[0]["result"] == 9
