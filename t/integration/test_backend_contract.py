"""One contract for every result backend: memory, SQLite, PostgreSQL, MariaDB, Redis, GCS.

``rpc://`` stores nothing (results are messages to the sender's queue), so it cannot keep
this contract: t/integration/test_backend_rpc.py covers it on RabbitMQ and Redis.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import backend_procs
import gcs_emulator
import pytest
import services
import sqlalchemy as sa

from taskframe import states
from taskframe.backends import Backend, BackendOptions, create_backend
from taskframe.backends.database import DatabaseBackend
from taskframe.errors import ContentDisallowed, TaskRevokedError
from taskframe.errors import TimeoutError as ResultTimeout
from taskframe.protocol import ResultContext, decode_result, group_tuple, result_tuple

Factory = Callable[..., Backend]
DATABASES = ["sqlite", "postgres", "mysql"]
#: Stores several processes share (the memory backend is one process by design).
SHARED = [*DATABASES, "redis", "gcs"]


def _url(kind: str, tmp_path: Path, suffix: str) -> str:
    if kind == "memory":
        return "memory://"
    if kind == "sqlite":
        return f"db+sqlite:///{tmp_path}/results.sqlite3"
    if kind == "postgres":
        return "db+" + services.postgres_url()
    if kind == "redis":  # db 11 and a prefix of this test's own; keys deleted after
        return f"{services.redis_url(11)}?global_keyprefix=tf-contract-{suffix}:"
    if kind == "gcs":  # a base path of this test's own in the emulator's bucket
        return gcs_emulator.backend_url(f"tf-contract-{suffix}")
    return "db+" + services.mysql_url()


@pytest.fixture(params=["memory", *DATABASES, "redis", "gcs"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_backend(kind: str, tmp_path: Path) -> Iterator[Factory]:
    """Backends on tables unique to this test, dropped afterwards."""
    suffix = uuid.uuid4().hex[:10]
    url = _url(kind, tmp_path, suffix)
    tables = {"task": f"tf_task_{suffix}", "group": f"tf_group_{suffix}",
              "counter": f"tf_counter_{suffix}", "revoked": f"tf_revoked_{suffix}"}
    made: list[Backend] = []

    def factory(**options: Any) -> Backend:
        backend = create_backend(url, BackendOptions(table_names=tables, **options))
        made.append(backend)
        return backend

    factory.url = url  # type: ignore[attr-defined]
    factory.tables = tables  # type: ignore[attr-defined]
    yield factory
    for backend in made:
        backend.close()
    if kind == "redis":
        services.redis_delete_prefix(11, f"tf-contract-{suffix}:")
    elif kind == "gcs":
        gcs_emulator.delete_base_path(f"tf-contract-{suffix}")
    elif kind != "memory":
        engine = sa.create_engine(DatabaseBackend(url, BackendOptions(
            table_names=tables, create_tables_at_setup=False))._sa_url)
        with engine.begin() as conn:
            for name in tables.values():
                # Plain DROP TABLE: the shared Celery sequence names must survive.
                conn.exec_driver_sql(f"DROP TABLE IF EXISTS {name}")
        engine.dispose()


@pytest.fixture
def backend(make_backend: Factory) -> Backend:
    return make_backend()


def tid() -> str:
    return str(uuid.uuid4())


def test_unknown_task_is_pending(backend: Backend) -> None:
    task_id = tid()
    meta = backend.get_task_meta(task_id)
    assert meta["status"] == states.PENDING and meta["result"] is None
    assert meta["task_id"] == task_id


def test_store_get_forget(backend: Backend) -> None:
    task_id = tid()
    value = {"n": [1, 2.5, "three", None, True]}
    written = backend.store_result(task_id, value, states.SUCCESS)
    meta = backend.get_task_meta(task_id)
    assert meta["status"] == states.SUCCESS and meta["result"] == value
    assert meta["task_id"] == task_id and meta["date_done"] == written["date_done"]
    backend.forget(task_id)
    assert backend.get_task_meta(task_id)["status"] == states.PENDING
    backend.forget(task_id)  # forgetting twice is fine


def test_states_progress_then_success_is_final(backend: Backend) -> None:
    task_id = tid()
    backend.mark_as_started(task_id, meta={"pid": 1, "hostname": "w@h"})
    started = backend.get_task_meta(task_id)
    assert started["status"] == states.STARTED and started["date_done"] is None
    assert started["result"] == {"pid": 1, "hostname": "w@h"}
    backend.mark_as_done(task_id, 7)
    kept = backend.mark_as_failure(task_id, ValueError("late duplicate"))
    assert kept["status"] == states.SUCCESS and kept["result"] == 7
    assert backend.store_result(task_id, 8, states.SUCCESS)["result"] == 7
    assert backend.mark_as_revoked(task_id)["status"] == states.SUCCESS
    assert backend.get_task_meta(task_id)["result"] == 7


def test_concurrent_writers_never_replace_success(backend: Backend) -> None:
    task_id = tid()
    returned: list[Any] = []
    lock = threading.Lock()

    def write(i: int) -> None:
        if i % 2:
            meta = backend.store_result(task_id, f"value-{i}", states.SUCCESS)
        else:
            meta = backend.store_result(task_id, RuntimeError(i), states.FAILURE)
        with lock:
            returned.append(meta)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    final = backend.get_task_meta(task_id)
    assert final["status"] == states.SUCCESS
    successes = {m["result"] for m in returned if m["status"] == states.SUCCESS}
    assert successes == {final["result"]}


def test_exceptions_round_trip(backend: Backend) -> None:
    task_id = tid()
    backend.mark_as_failure(task_id, ValueError("boom", 42), traceback="Traceback: here")
    meta = backend.get_task_meta(task_id)
    assert meta["status"] == states.FAILURE and meta["traceback"] == "Traceback: here"
    assert meta["result"] == {"exc_type": "ValueError", "exc_message": ["boom", 42],
                              "exc_module": "builtins"}
    exc = decode_result(meta)
    assert isinstance(exc, ValueError) and exc.args == ("boom", 42)

    retry_id = tid()
    backend.mark_as_retry(retry_id, KeyError("missing"))
    assert isinstance(decode_result(backend.get_task_meta(retry_id)), KeyError)

    revoked_id = tid()
    backend.mark_as_revoked(revoked_id, "expired")
    revoked = backend.get_task_meta(revoked_id)
    assert revoked["status"] == states.REVOKED
    exc = decode_result(revoked)
    assert isinstance(exc, TaskRevokedError) and exc.args == ("expired",)


def test_children_and_extended_fields(make_backend: Factory) -> None:
    backend = make_backend(extended=True)
    task_id = tid()
    ctx = ResultContext(name="t.add", args=[1, "two"], kwargs={"k": [3]}, worker="w1@host",
                        retries=2, queue="celery", children=[result_tuple("child-1")])
    backend.store_result(task_id, 3, states.SUCCESS, context=ctx)
    meta = backend.get_task_meta(task_id)
    assert meta["children"] == [[["child-1", None], None]]
    assert (meta["name"], meta["args"], meta["kwargs"]) == ("t.add", [1, "two"], {"k": [3]})
    assert (meta["worker"], meta["retries"], meta["queue"]) == ("w1@host", 2, "celery")


def test_groups(backend: Backend) -> None:
    group_id = tid()
    assert backend.restore_group(group_id) is None
    value = group_tuple(group_id, [result_tuple("a"), result_tuple("b")])
    backend.save_group(group_id, value)
    assert backend.restore_group(group_id) == value
    replaced = group_tuple(group_id, [result_tuple("c")])
    backend.save_group(group_id, replaced)
    assert backend.restore_group(group_id) == replaced
    backend.delete_group(group_id)
    assert backend.restore_group(group_id) is None
    backend.delete_group(group_id)


def test_wait_for_returns_when_another_thread_stores(backend: Backend) -> None:
    task_id = tid()
    backend.mark_as_started(task_id)

    def finish_later() -> None:
        time.sleep(0.2)
        backend.mark_as_done(task_id, "done")

    thread = threading.Thread(target=finish_later)
    thread.start()
    try:
        meta = backend.wait_for(task_id, timeout=60, interval=0.05)
    finally:
        thread.join()
    assert meta["status"] == states.SUCCESS and meta["result"] == "done"


def test_wait_for_times_out(backend: Backend) -> None:
    task_id = tid()
    backend.mark_as_started(task_id)
    with pytest.raises(ResultTimeout, match=task_id):
        backend.wait_for(task_id, timeout=0.3, interval=0.05)


def test_cleanup(make_backend: Factory) -> None:
    backend = make_backend(expires=3600.0)
    finished, running, group_id = tid(), tid(), tid()
    backend.mark_as_done(finished, 1)
    backend.mark_as_started(running)
    backend.save_group(group_id, group_tuple(group_id, []))
    assert backend.cleanup() == 0
    assert backend.get_task_meta(finished)["status"] == states.SUCCESS
    # A cutoff a minute in the future makes every finished row "expired" now,
    # without waiting for the clock.
    backend.options.expires = -60.0
    assert backend.cleanup() == 2
    assert backend.get_task_meta(finished)["status"] == states.PENDING
    assert backend.restore_group(group_id) is None
    assert backend.get_task_meta(running)["status"] == states.STARTED  # no date_done: kept


def test_incr(backend: Backend) -> None:
    key, other = f"chord-unlock-{tid()}", f"chord-unlock-{tid()}"
    assert [backend.incr(key) for _ in range(3)] == [1, 2, 3]
    assert backend.incr(other) == 1
    assert backend.incr(key) == 4


@pytest.mark.parametrize("kind", SHARED)
def test_incr_from_many_processes(make_backend: Factory) -> None:
    make_backend()  # creates the tables once, before the children race
    url, tables = make_backend.url, make_backend.tables  # type: ignore[attr-defined]
    key = f"chord-unlock-{tid()}"
    shares = [13] * 4 + [12] * 4  # 100 increments over 8 processes
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(8) as pool:
        seen = pool.map(backend_procs.increment_star,
                        [(url, tables, key, n) for n in shares])
    values = sorted(v for chunk in seen for v in chunk)
    assert values == list(range(1, 101))  # every increment counted once, none lost
    assert make_backend().incr(key) == 101


def test_revoked_ids(backend: Backend) -> None:
    assert backend.load_revokes() == {}
    before = backend.revokes_version()
    soon, later = time.time() + 60, time.time() + 600
    backend.add_revokes({"a": soon, "b": later})
    assert backend.revokes_version() != before
    backend.add_revokes({"a": later, "b": soon, "gone": time.time() - 1})  # later one wins
    assert backend.load_revokes() == pytest.approx({"a": later, "b": later})


@pytest.mark.parametrize("kind", SHARED)
def test_concurrent_revokes_are_never_lost(make_backend: Factory) -> None:
    """8 processes record 25 revoked ids each, one call per id, at the same time: every id
    is kept (a read-merge-write of one record lost some of each other's)."""
    from taskframe.control.revoked import RevokeStore

    make_backend()  # creates the tables once, before the children race
    url, tables = make_backend.url, make_backend.tables  # type: ignore[attr-defined]
    shares = [[f"{n}-{i}-{tid()}" for i in range(25)] for n in range(8)]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(8) as pool:
        pool.map(backend_procs.revoke_star, [(url, tables, ids) for ids in shares])
    wanted = {task_id for ids in shares for task_id in ids}
    stored = set(RevokeStore(make_backend()).load())
    assert wanted - stored == set(), f"{len(wanted - stored)} of {len(wanted)} revokes lost"


@pytest.mark.parametrize("kind", ["memory"])
def test_concurrent_revokes_from_threads_are_never_lost(backend: Backend) -> None:
    from taskframe.control.revoked import RevokeStore

    store = RevokeStore(backend)
    shares = [[f"{n}-{i}" for i in range(50)] for n in range(8)]

    def revoke(ids: list[str]) -> None:
        for task_id in ids:
            store.add([task_id], 600.0)

    threads = [threading.Thread(target=revoke, args=(ids,)) for ids in shares]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(store.load()) == {task_id for ids in shares for task_id in ids}


@pytest.mark.parametrize("kind", DATABASES)
def test_legacy_pickle_rows_need_pickle_accepted(make_backend: Factory) -> None:
    import pickle

    backend = make_backend()
    assert isinstance(backend, DatabaseBackend)
    task_id = tid()
    backend.mark_as_done(task_id, None)
    engine = sa.create_engine(backend._sa_url)
    table = make_backend.tables["task"]  # type: ignore[attr-defined]
    with engine.begin() as conn:  # what Celery 5.5's PickleType column holds
        conn.execute(sa.text(f"UPDATE {table} SET result = :r WHERE task_id = :t"),
                     {"r": pickle.dumps({"legacy": 1}, protocol=4), "t": task_id})
    engine.dispose()
    with pytest.raises(ContentDisallowed, match="pickle"):
        backend.get_task_meta(task_id)
    trusting = make_backend(accept=("json", "pickle"))
    assert trusting.get_task_meta(task_id)["result"] == {"legacy": 1}


@pytest.mark.parametrize("kind", ["postgres"])
def test_recovers_when_the_server_drops_the_connection(make_backend: Factory) -> None:
    name = f"tf-contract-{uuid.uuid4().hex[:8]}"
    # No pre-ping, so the dead pooled connection is really used and must be retried.
    backend = make_backend(engine_options={"pool_pre_ping": False,
                                           "connect_args": {"application_name": name}})
    first, second = tid(), tid()
    backend.mark_as_done(first, 1)
    admin = sa.create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/test")
    with admin.begin() as conn:
        killed = conn.execute(
            sa.text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = :name"), {"name": name}).scalar_one()
    admin.dispose()
    assert killed >= 1
    backend.mark_as_done(second, 2)
    assert backend.get_task_meta(first)["result"] == 1
    assert backend.get_task_meta(second)["result"] == 2


def test_get_task_metas(backend: Backend) -> None:
    done, failed, unknown = tid(), tid(), tid()
    backend.mark_as_done(done, [1, "x"])
    backend.mark_as_failure(failed, KeyError("k"))
    metas = backend.get_task_metas([done, unknown, failed, done])
    assert list(metas) == [done, unknown, failed]  # each id once, in the order asked
    assert metas[done]["status"] == states.SUCCESS and metas[done]["result"] == [1, "x"]
    assert metas[done]["task_id"] == done
    assert metas[unknown]["status"] == states.PENDING and metas[unknown]["task_id"] == unknown
    assert isinstance(decode_result(metas[failed]), KeyError)
    assert metas == {task_id: backend.get_task_meta(task_id)
                     for task_id in (done, unknown, failed)}
    assert backend.get_task_metas([]) == {}


def test_get_task_metas_of_many(backend: Backend) -> None:
    ids = [tid() for _ in range(1200)]  # past the database's IN batch of 500
    for task_id in ids[::100]:
        backend.mark_as_done(task_id, task_id)
    metas = backend.get_task_metas(ids)
    assert len(metas) == 1200
    assert {i for i, m in metas.items() if m["status"] == states.SUCCESS} == set(ids[::100])
    assert all(metas[i]["result"] == i for i in ids[::100])


def test_task_result_exists(backend: Backend) -> None:
    task_id = tid()
    assert not backend.task_result_exists(task_id)
    backend.mark_as_started(task_id)
    assert backend.task_result_exists(task_id)
    backend.mark_as_done(task_id, None)
    assert backend.task_result_exists(task_id)
    backend.forget(task_id)
    assert not backend.task_result_exists(task_id)


def test_cleanup_with_failure_expires(make_backend: Factory) -> None:
    backend = make_backend(expires=3600.0, failure_expires=-60.0)
    ok, bad, revoked = tid(), tid(), tid()
    backend.mark_as_done(ok, 1)
    backend.mark_as_failure(bad, ValueError("gone soon"))
    backend.mark_as_revoked(revoked)
    assert backend.cleanup() == 1  # only the FAILURE is past its (shorter) time
    assert backend.get_task_meta(bad)["status"] == states.PENDING
    assert backend.get_task_meta(ok)["status"] == states.SUCCESS
    assert backend.get_task_meta(revoked)["status"] == states.REVOKED
    # failure_expires alone (results otherwise kept forever) still cleans failures.
    forever = make_backend(expires=None, failure_expires=-60.0)
    kept, again = tid(), tid()
    forever.mark_as_done(kept, 2)
    forever.mark_as_failure(again, ValueError("x"))
    assert forever.cleanup() == 1
    assert forever.get_task_meta(kept)["status"] == states.SUCCESS
    assert forever.get_task_meta(again)["status"] == states.PENDING
