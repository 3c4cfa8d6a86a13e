"""The results API (AsyncResult, GroupResult, ResultSet) on the memory backend."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import pytest

import taskframe.result
from taskframe import GroupResult, ResultSet, Taskframe, states
from taskframe.backends.base import BackendOptions
from taskframe.backends.memory import MemoryBackend
from taskframe.context import Context, request_context
from taskframe.errors import IncompleteStream, ResultError
from taskframe.errors import TimeoutError as ResultTimeout
from taskframe.protocol import ResultContext, group_tuple, result_tuple
from taskframe.protocol.results import ResultMeta
from taskframe.result import AsyncResult, EagerResult, result_from_tuple


class CountingBackend(MemoryBackend):
    """The memory backend, counting single and bulk reads (to see which path ran)."""

    def __init__(self) -> None:
        super().__init__("memory://")
        self.single_reads = 0
        self.bulk_reads: list[list[str]] = []

    def get_task_meta(self, task_id: str) -> ResultMeta:
        self.single_reads += 1
        return super().get_task_meta(task_id)

    def get_task_metas(self, task_ids: Iterable[str]) -> dict[str, ResultMeta]:
        ids = list(task_ids)
        self.bulk_reads.append(ids)
        return super().get_task_metas(ids)


@pytest.fixture
def backend() -> CountingBackend:
    return CountingBackend()


@pytest.fixture
def app() -> Iterator[Taskframe]:
    app = Taskframe("ra", broker=f"memory://{uuid.uuid4().hex}", backend="memory://",
                    set_as_current=False)
    yield app
    app.close()


def tid() -> str:
    return str(uuid.uuid4())


def results(backend: MemoryBackend, n: int) -> list[AsyncResult[Any]]:
    return [AsyncResult(tid(), backend=backend) for _ in range(n)]


# -- AsyncResult ----------------------------------------------------------------------


def test_then_runs_once_when_get_sees_the_result(backend: CountingBackend) -> None:
    result: AsyncResult[int] = AsyncResult(tid(), backend=backend)
    seen: list[tuple[str, Any]] = []
    result.then(lambda r: seen.append(("first", r.result)))
    assert not result.ready() and seen == []
    backend.mark_as_done(result.id, 7)
    assert result.get(timeout=5) == 7
    assert seen == [("first", 7)]
    result.then(lambda r: seen.append(("late", r.result)))  # already ready: at once
    assert result.wait(timeout=5) == 7 and result.ready()
    assert seen == [("first", 7), ("late", 7)]


def test_then_fires_on_any_read_that_finds_it_ready(backend: CountingBackend) -> None:
    result: AsyncResult[Any] = AsyncResult(tid(), backend=backend)
    seen: list[AsyncResult[Any]] = []
    result.then(seen.append)
    backend.mark_as_failure(result.id, KeyError("k"))
    assert result.state == states.FAILURE
    assert seen == [result]


def test_then_errors_go_to_on_error_or_the_log(backend: CountingBackend,
                                               caplog: pytest.LogCaptureFixture) -> None:
    result: AsyncResult[Any] = AsyncResult(tid(), backend=backend)
    errors: list[BaseException] = []

    def broken(_: Any) -> None:
        raise ValueError("callback broke")

    result.then(broken, on_error=errors.append)
    result.then(broken)
    backend.mark_as_done(result.id, "v")
    with caplog.at_level(logging.ERROR, logger="taskframe.result"):
        assert result.get(timeout=5) == "v"  # the value survives broken callbacks
    assert [str(e) for e in errors] == ["callback broke"]
    assert "then() callback" in caplog.text


def test_maybe_throw_does_not_wait(backend: CountingBackend) -> None:
    result: AsyncResult[Any] = AsyncResult(tid(), backend=backend)
    assert result.maybe_throw() is None  # pending: nothing to raise
    backend.mark_as_failure(result.id, ZeroDivisionError("nope"))
    with pytest.raises(ZeroDivisionError, match="nope"):
        result.maybe_throw()
    seen: list[tuple[str, Any]] = []
    exc = result.maybe_throw(propagate=False, callback=lambda i, v: seen.append((i, v)))
    assert isinstance(exc, ZeroDivisionError) and seen == [(result.id, exc)]


def test_exists_tells_pending_from_unknown(backend: CountingBackend) -> None:
    result: AsyncResult[Any] = AsyncResult(tid(), backend=backend)
    assert not result.exists() and result.state == states.PENDING
    backend.store_result(result.id, None, states.PENDING)  # a stored PENDING is a record
    assert result.exists()
    result.forget()
    assert not result.exists()


def test_children_parent_and_tuples(backend: CountingBackend) -> None:
    root, child, gid, member = tid(), tid(), tid(), tid()
    ctx = ResultContext(children=[result_tuple(child, result_tuple(root)),
                                  group_tuple(gid, [result_tuple(member)])])
    backend.store_result(root, 1, states.SUCCESS, context=ctx)
    result: AsyncResult[Any] = AsyncResult(root, backend=backend)
    first, group = result.children
    assert isinstance(first, AsyncResult) and first.id == child
    assert first.parent == root and first.as_tuple() == result_tuple(child, result_tuple(root))
    assert isinstance(group, GroupResult) and group.id == gid and group.results == [member]
    assert group.as_tuple() == group_tuple(gid, [result_tuple(member)])
    assert first.backend is backend and group.backend is backend
    assert result.children is result.children  # ready: built once


def test_collect_walks_the_tree_breadth_first(backend: CountingBackend) -> None:
    root, a, b, leaf = tid(), tid(), tid(), tid()
    backend.store_result(root, "root", states.SUCCESS, context=ResultContext(
        children=[result_tuple(a), group_tuple("g-" + b, [result_tuple(b)])]))
    backend.store_result(a, "a", states.SUCCESS)
    backend.store_result(b, "b", states.SUCCESS,
                         context=ResultContext(children=[result_tuple(leaf)]))
    backend.store_result(leaf, "leaf", states.SUCCESS)
    pairs = list(AsyncResult(root, backend=backend).collect(timeout=5))
    assert [value for _, value in pairs] == ["root", "a", ["b"], "b", "leaf"]
    assert AsyncResult(root, backend=backend).get_leaf() == "leaf"


def test_iterdeps_stops_at_an_unready_node(backend: CountingBackend) -> None:
    root, running = tid(), tid()
    backend.store_result(root, 0, states.SUCCESS,
                         context=ResultContext(children=[result_tuple(running)]))
    result: AsyncResult[Any] = AsyncResult(root, backend=backend)
    with pytest.raises(IncompleteStream):
        list(result.iterdeps())
    assert [node.id for _, node in result.iterdeps(intermediate=True)] == [root, running]


def test_eager_result_api() -> None:
    ok: EagerResult[int] = EagerResult("e1", 3, states.SUCCESS)
    seen: list[Any] = []
    ok.then(seen.append)
    assert seen == [ok] and ok.maybe_throw() == 3 and ok.children == []
    failed: EagerResult[Any] = EagerResult("e2", KeyError("k"), states.FAILURE, "tb")
    with pytest.raises(KeyError):
        failed.maybe_throw()


def test_a_group_of_eager_results_needs_no_backend() -> None:
    group = GroupResult("g", [EagerResult("e1", 1, states.SUCCESS),
                              EagerResult("e2", KeyError("k"), states.FAILURE)])
    seen: list[Any] = []
    group.then(seen.append)  # every member is known ready: at once
    assert seen == [group] and group.ready() and group.failed()
    values = group.get(propagate=False)
    assert values[0] == 1 and isinstance(values[1], KeyError)
    with pytest.raises(KeyError):
        group.join()


def test_result_from_tuple_accepts_ids_and_results(backend: CountingBackend) -> None:
    made = result_from_tuple("plain-id", backend=backend)
    assert isinstance(made, AsyncResult) and made.id == "plain-id"
    assert result_from_tuple(made) is made
    assert taskframe.result.GroupResult is GroupResult  # as celery.result exports it


# -- GroupResult / ResultSet ----------------------------------------------------------


def test_group_save_restore_delete(app: Taskframe) -> None:
    members = [app.AsyncResult(tid()) for _ in range(3)]
    group = GroupResult(tid(), members, app=app)
    assert group.save() is group
    restored = GroupResult.restore(group.id, app=app)
    assert restored is not None and restored == group
    assert [r.id for r in restored] == [r.id for r in members]
    assert app.backend.restore_group(group.id) == group.as_tuple()  # Celery's tuple
    group.delete()
    assert GroupResult.restore(group.id, app=app) is None
    assert GroupResult.restore(group.id, backend=app.backend) is None


def test_restore_of_a_task_tuple_is_refused(backend: CountingBackend) -> None:
    backend.save_group("not-a-group", result_tuple("t"))
    with pytest.raises(ResultError, match="not a group"):
        GroupResult.restore("not-a-group", backend=backend)


def test_group_get_is_ordered_and_aggregates(backend: CountingBackend) -> None:
    members = results(backend, 4)
    group = GroupResult(tid(), members, backend=backend)
    assert len(group) == 4 and list(group) == members and group[2] is members[2]
    assert group.waiting() and not group.ready() and group.completed_count() == 0
    for i, result in reversed(list(enumerate(members))):
        backend.mark_as_done(result.id, i * 10)
    assert group.get(timeout=5) == [0, 10, 20, 30]
    assert group.join(timeout=5) == [0, 10, 20, 30]
    assert group.ready() and group.successful() and not group.failed()
    assert group.completed_count() == 4 and not group.waiting()
    group.forget()
    assert backend.get_task_meta(members[0].id)["status"] == states.PENDING


def test_group_propagates_or_returns_the_failure(backend: CountingBackend) -> None:
    ok, bad = results(backend, 2)
    backend.mark_as_done(ok.id, 1)
    backend.mark_as_failure(bad.id, ValueError("bad part"))
    group = GroupResult(tid(), [ok, bad], backend=backend)
    with pytest.raises(ValueError, match="bad part"):
        group.get(timeout=5)
    values = group.get(timeout=5, propagate=False)
    assert values[0] == 1 and isinstance(values[1], ValueError)
    assert group.failed() and not group.successful() and group.completed_count() == 1
    with pytest.raises(ValueError):
        group.maybe_throw()


def test_group_get_times_out(backend: CountingBackend) -> None:
    done, running = results(backend, 2)
    backend.mark_as_done(done.id, 1)
    with pytest.raises(ResultTimeout):
        GroupResult(tid(), [done, running], backend=backend).get(timeout=0.2)
    with pytest.raises(ResultTimeout, match="1 of 2"):
        ResultSet([done, running]).join_native(timeout=0.2, interval=0.05)


def test_join_native_reads_in_bulk(backend: CountingBackend) -> None:
    members = results(backend, 5)
    finished = members[:3]
    for i, result in enumerate(finished):
        backend.mark_as_done(result.id, i)
    rset = ResultSet(members)

    def finish_rest() -> None:
        time.sleep(0.1)
        for result in members[3:]:
            backend.mark_as_done(result.id, "late")

    thread = threading.Thread(target=finish_rest)
    thread.start()
    try:
        values = rset.join_native(timeout=30, interval=0.02)
    finally:
        thread.join()
    assert values == [0, 1, 2, "late", "late"]
    assert backend.bulk_reads[0] == [r.id for r in members]
    # Rounds after the first ask only for what was still unready.
    assert all(set(ids) <= {r.id for r in members[3:]} for ids in backend.bulk_reads[1:])
    assert backend.single_reads == 0
    seen: list[tuple[str, Any]] = []
    assert rset.join_native(timeout=5, callback=lambda i, v: seen.append((i, v))) == []
    assert seen == [(r.id, v) for r, v in zip(members, values, strict=True)]


def test_set_then_fires_when_all_are_ready(backend: CountingBackend) -> None:
    first, second = results(backend, 2)
    rset = ResultSet([first, second])
    seen: list[ResultSet] = []
    rset.then(seen.append)
    backend.mark_as_done(first.id, 1)
    assert not rset.ready() and seen == []
    backend.mark_as_done(second.id, 2)
    assert rset.get(timeout=5) == [1, 2]
    assert seen == [rset]


def test_result_set_membership(backend: CountingBackend) -> None:
    a, b, c = results(backend, 3)
    rset = ResultSet([a])
    rset.add(a)
    rset.add(b)
    assert rset.results == [a, b]
    rset.update([b, c])
    assert rset.results == [a, b, c]
    rset.remove(b.id)  # by id, as Celery allows
    assert rset.results == [a, c]
    with pytest.raises(KeyError):
        rset.remove(b)
    rset.discard(b)
    rset.discard(a)
    assert rset.results == [c]
    kept = rset.results
    rset.clear()
    assert rset.results is kept and len(rset) == 0 and rset.ready()


def test_nested_groups_join(backend: CountingBackend) -> None:
    inner_members = results(backend, 2)
    outer_member = AsyncResult(tid(), backend=backend)
    inner = GroupResult(tid(), inner_members, backend=backend)
    outer = GroupResult(tid(), [outer_member, inner], backend=backend)
    for i, result in enumerate([outer_member, *inner_members]):
        backend.mark_as_done(result.id, i)
    assert outer.get(timeout=5) == [0, [1, 2]]
    assert outer.join_native(timeout=5) == [0, [1, 2]]
    assert outer.as_tuple() == group_tuple(outer.id, [
        result_tuple(outer_member.id),
        group_tuple(inner.id, [result_tuple(r.id) for r in inner_members])])


def test_waiting_inside_a_task_is_refused(backend: CountingBackend) -> None:
    group = GroupResult(tid(), results(backend, 1), backend=backend)
    with request_context(Context(id=tid(), task="t")), pytest.raises(RuntimeError,
                                                                     match="deadlock"):
        group.get(timeout=1)
    backend.mark_as_done(group[0].id, 5)
    with request_context(Context(id=tid(), task="t")):
        assert group.get(timeout=1, disable_sync_subtasks=False) == [5]


def test_failure_expires_in_cleanup() -> None:
    backend = MemoryBackend(options=BackendOptions(expires=3600.0, failure_expires=-60.0))
    ok, bad = tid(), tid()
    backend.mark_as_done(ok, 1)
    backend.mark_as_failure(bad, KeyError("k"))
    assert backend.cleanup() == 1
    assert not backend.task_result_exists(bad) and backend.task_result_exists(ok)


def test_app_passes_the_result_settings_to_backends(app: Taskframe) -> None:
    app.conf.result_failure_expires = 60
    app.conf.result_persistent = True
    app.conf.database_short_lived_sessions = True
    options = app.backend_options()
    assert options.failure_expires == 60.0 and options.expires == 86400.0
    assert options.persistent and options.short_lived_sessions
    assert options.reply_to == app.origin and options.connection is not None
