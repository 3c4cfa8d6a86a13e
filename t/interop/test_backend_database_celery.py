"""Celery 5.7's DatabaseBackend and ours share one SQLite file, in both directions."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import celery
import pytest
from celery.app.task import Context

from taskframe import states
from taskframe.backends import BackendOptions, create_backend
from taskframe.backends.base import Backend
from taskframe.protocol import ResultContext, decode_result, group_tuple, result_tuple

pytestmark = pytest.mark.interop


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"db+sqlite:///{tmp_path}/results.sqlite3"


def celery_app(url: str, *, extended: bool = False) -> celery.Celery:
    app = celery.Celery("interop-db", broker="memory://", backend=url, set_as_current=False)
    app.conf.result_extended = extended
    return app


@pytest.fixture
def ours(url: str) -> Iterator[Backend]:
    backend = create_backend(url, BackendOptions(extended=True))
    yield backend
    backend.close()


def test_celery_reads_what_we_wrote(url: str, ours: Backend) -> None:
    ours.mark_as_done("ok-1", {"a": [1, 2], "b": None})
    ours.mark_as_failure("bad-1", ValueError("boom", 42), traceback="Traceback (most recent)")
    ours.mark_as_revoked("rev-1", "expired")
    ours.mark_as_started("run-1", meta={"pid": 5, "hostname": "w@h"})
    app = celery_app(url)
    try:
        assert app.AsyncResult("ok-1").get(timeout=10) == {"a": [1, 2], "b": None}
        failed = app.AsyncResult("bad-1")
        assert failed.state == "FAILURE" and failed.traceback == "Traceback (most recent)"
        exc = failed.get(timeout=10, propagate=False)
        assert type(exc) is ValueError and exc.args == ("boom", 42)
        revoked = app.AsyncResult("rev-1").get(timeout=10, propagate=False)
        assert type(revoked) is celery.exceptions.TaskRevokedError
        assert revoked.args == ("expired",)
        running = app.backend.get_task_meta("run-1")
        assert running["status"] == "STARTED" and running["result"] == {"pid": 5,
                                                                        "hostname": "w@h"}
        assert app.backend.get_task_meta("unknown")["status"] == "PENDING"
    finally:
        app.close()


def test_we_read_what_celery_wrote(url: str) -> None:
    app = celery_app(url)  # Celery creates the tables here (without extended columns)
    try:
        app.backend.store_result("ok-2", [3, "x"], "SUCCESS")
        app.backend.mark_as_failure("bad-2", KeyError("k"), traceback="tb text")
        app.backend.mark_as_retry("retry-2", celery.exceptions.Retry("again"))
    finally:
        app.close()
    ours = create_backend(url, BackendOptions())  # adds the columns it misses
    try:
        meta = ours.get_task_meta("ok-2")
        assert meta["status"] == states.SUCCESS and decode_result(meta) == [3, "x"]
        failed = ours.get_task_meta("bad-2")
        assert failed["traceback"] == "tb text"
        exc = decode_result(failed)
        assert type(exc) is KeyError and exc.args == ("k",)
        assert type(decode_result(ours.get_task_meta("retry-2"))).__name__ == "Retry"
        # And Celery still reads its rows from the table we extended.
        again = celery_app(url)
        try:
            assert again.AsyncResult("ok-2").get(timeout=10) == [3, "x"]
        finally:
            again.close()
    finally:
        ours.close()


def test_success_written_by_celery_is_not_overwritten(url: str) -> None:
    app = celery_app(url)
    try:
        app.backend.store_result("dup", 1, "SUCCESS")
    finally:
        app.close()
    ours = create_backend(url, BackendOptions())
    try:
        kept = ours.mark_as_failure("dup", RuntimeError("duplicate run"))
        assert kept["status"] == states.SUCCESS and kept["result"] == 1
    finally:
        ours.close()


def test_extended_fields_both_ways(url: str, ours: Backend) -> None:
    ctx = ResultContext(name="tasks.add", args=[1, 2], kwargs={"z": 3}, worker="tf@host",
                        retries=1, queue="celery")
    ours.store_result("ext-ours", 6, states.SUCCESS, context=ctx)
    app = celery_app(url, extended=True)
    try:
        meta = app.backend.get_task_meta("ext-ours")
        assert (meta["name"], meta["args"], meta["kwargs"]) == ("tasks.add", [1, 2], {"z": 3})
        assert (meta["worker"], meta["retries"], meta["queue"]) == ("tf@host", 1, "celery")
        request = Context(task="tasks.mul", args=[4, 5], kwargs={}, hostname="celery@host",
                          retries=0, delivery_info={"routing_key": "q1"})
        app.backend.store_result("ext-celery", 20, "SUCCESS", request=request)
    finally:
        app.close()
    meta = ours.get_task_meta("ext-celery")
    assert (meta["name"], meta["args"], meta["kwargs"]) == ("tasks.mul", [4, 5], {})
    assert (meta["worker"], meta["queue"]) == ("celery@host", "q1")


def test_groups_both_ways(url: str, ours: Backend) -> None:
    ours.save_group("g-ours", group_tuple("g-ours", [result_tuple("a"), result_tuple("b")]))
    app = celery_app(url)
    try:
        restored = app.backend.restore_group("g-ours")
        assert restored.id == "g-ours"
        assert [r.id for r in restored.results] == ["a", "b"]
        app.GroupResult("g-celery", [app.AsyncResult("c"), app.AsyncResult("d")]).save(
            backend=app.backend)
    finally:
        app.close()
    assert ours.restore_group("g-celery") == group_tuple(
        "g-celery", [result_tuple("c"), result_tuple("d")])
