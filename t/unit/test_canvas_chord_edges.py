"""Chord edge cases on the memory transport: revoked header parts, nested groups in a
header, counter cleanup, several links and ``replaced_task_nesting``."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from taskframe import Task, Taskframe, states
from taskframe.backends.memory import MemoryBackend
from taskframe.canvas import chord, group
from taskframe.context import Context, current_request
from taskframe.errors import ChordError
from taskframe.worker.worker import Worker

T = 10  # seconds any one result may take


class Seen:
    """What tasks saw, shared with the worker's threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[tuple[str, Any]] = []
        self.event = threading.Event()

    def add(self, name: str, value: Any) -> None:
        with self.lock:
            self.items.append((name, value))
        self.event.set()

    def wait_for(self, name: str, count: int = 1) -> list[Any]:
        for _ in range(100):
            with self.lock:
                found = [v for n, v in self.items if n == name]
            if len(found) >= count:
                return found
            self.event.wait(0.1)
            self.event.clear()
        raise AssertionError(f"{name} seen fewer than {count} times: {self.items}")


@pytest.fixture
def app() -> Iterator[Taskframe]:
    app = Taskframe("ce", broker=f"memory://{uuid.uuid4().hex}", backend="memory://",
                    set_as_current=False)
    yield app
    app.close()


@pytest.fixture
def seen() -> Seen:
    return Seen()


@pytest.fixture
def tasks(app: Taskframe, seen: Seen) -> Any:
    class NS:
        @app.task
        def add(x: int, y: int) -> int:
            return x + y

        @app.task
        def ident(x: Any) -> Any:
            return x

        @app.task
        def note(value: Any, tag: str) -> None:
            request = current_request()
            assert request is not None
            seen.add(tag, (value, request.group))
            seen.add(tag + " priority", request.priority)

        @app.task
        def on_error(request: Context, exc: BaseException, traceback: str) -> None:
            seen.add("on_error", (request.id, type(exc).__name__, str(exc)))

        @app.task
        async def slow(x: int) -> int:
            seen.add("slow started", x)
            await asyncio.sleep(30)
            return x

        @app.task(bind=True)
        def replacer(self: Task[Any, Any], x: int) -> None:
            self.replace(NS.nesting.s(x))

        @app.task(bind=True)
        def replacer_twice(self: Task[Any, Any], x: int) -> None:
            self.replace(NS.replacer.s(x))

        @app.task(bind=True)
        def nesting(self: Task[Any, Any], x: int) -> list[int]:
            return [x, int(self.request.headers.get("replaced_task_nesting") or 0)]

    return NS


def _start(app: Taskframe, pool: str = "threads") -> tuple[Worker, threading.Thread]:
    w = Worker(app, pool=pool, concurrency=4, setup_logs=False, install_signal_handlers=False)
    thread = threading.Thread(target=w.start, daemon=True)
    thread.start()
    return w, thread


@pytest.fixture
def worker(app: Taskframe, tasks: Any) -> Iterator[Worker]:
    w, thread = _start(app)
    yield w
    w.stop()
    thread.join(10)
    assert not thread.is_alive()


# -- 1. a revoked header task still counts ---------------------------------------------


def test_expired_header_task_fails_the_body_with_chord_error(app: Taskframe, tasks: Any,
                                                             seen: Seen,
                                                             worker: Worker) -> None:
    expired = tasks.add.s(2, 2).set(expires=-1)  # already expired when the worker gets it
    body = tasks.ident.s().on_error(tasks.on_error.s())
    result = chord([tasks.add.s(1, 1), expired], body).delay()
    with pytest.raises(ChordError, match="TaskRevokedError"):
        result.get(timeout=T)
    (header_ok, header_expired) = result.parent.results
    assert header_ok.get(timeout=T) == 2
    assert header_expired.state == states.REVOKED
    (errback,) = seen.wait_for("on_error")
    assert errback[:2] == (result.id, "ChordError")


def test_terminated_header_task_fails_the_body_with_chord_error(app: Taskframe, tasks: Any,
                                                                seen: Seen) -> None:
    w, thread = _start(app, pool="asyncio")
    try:
        result = chord([tasks.add.s(1, 1), tasks.slow.s(5)], tasks.ident.s()).delay()
        seen.wait_for("slow started")
        consumer = w.consumer
        assert consumer is not None
        (request,) = [r for r in list(consumer.active.values()) if r.task is tasks.slow]
        assert consumer.pool.terminate(request.job)
        with pytest.raises(ChordError, match="terminated"):
            result.get(timeout=T)
        assert result.parent.results[1].state == states.REVOKED
    finally:
        w.stop()
        thread.join(10)


# -- 2. groups nested in a chord header ------------------------------------------------


def test_a_group_in_a_header_is_unrolled_and_a_group_result_is_one_part(
        tasks: Any, worker: Worker) -> None:
    bare = chord([group(tasks.add.s(1, 1), tasks.add.s(2, 2), tasks.add.s(5, 5)),
                  tasks.add.s(3, 3)], tasks.ident.s()).delay()
    assert bare.get(timeout=T) == [2, 4, 10, 6]  # unrolled, in the order written
    assert len(bare.parent.results) == 4
    ending_in_group = chord([tasks.add.s(1, 1) | group(tasks.add.s(1), tasks.add.s(2)),
                             tasks.add.s(3, 3)], tasks.ident.s()).delay()
    assert ending_in_group.get(timeout=T) == [[3, 4], 6]  # Celery 5.7 gives the same
    group_body = chord([chord([tasks.add.s(1, 1), tasks.add.s(2, 2)],
                              group(tasks.ident.s(), tasks.ident.s())),
                        tasks.add.s(3, 3)], tasks.ident.s()).delay()
    assert group_body.get(timeout=T) == [[[2, 4], [2, 4]], 6]
    partial = chord([group(tasks.add.s(1), tasks.add.s(2)), tasks.add.s(3)], tasks.ident.s())
    assert partial.apply_async((10,)).get(timeout=T) == [11, 12, 13]


def test_eager_chords_give_the_same_shapes(app: Taskframe, tasks: Any) -> None:
    app.conf.task_always_eager = True
    assert chord([group(tasks.add.s(1, 1), tasks.add.s(2, 2)), tasks.add.s(3, 3)],
                 tasks.ident.s()).delay().get() == [2, 4, 6]
    assert chord([tasks.add.s(1, 1) | group(tasks.add.s(1), tasks.add.s(2)),
                  tasks.add.s(3, 3)], tasks.ident.s()).delay().get() == [[3, 4], 6]


# -- 3. counters are deleted once the chord fired --------------------------------------


def _chord_counters(app: Taskframe) -> dict[str, int]:
    backend = app.backend
    assert isinstance(backend, MemoryBackend)
    return {k: v for k, v in backend._counters.items() if k.startswith("chord-unlock-")}


def test_counters_and_header_are_deleted_after_the_body_is_sent(app: Taskframe, tasks: Any,
                                                                 seen: Seen,
                                                                 worker: Worker) -> None:
    result = chord([tasks.add.s(i, i) for i in range(5)], tasks.note.s("body")).delay()
    result.get(timeout=T)
    group_id = result.parent.id
    assert app.backend.restore_group(group_id) is None
    assert _chord_counters(app) == {}
    # A late copy of a header task (a redelivery) counts again but fires nothing.
    body = app.AsyncResult(result.id)
    chord_embed = {**dict(tasks.note.s("body").set(task_id=result.id)), "chord_size": 5}
    tasks.add.apply_async((0, 0), task_id=result.parent.results[0].id, group_id=group_id,
                          group_index=0, chord=chord_embed)
    assert tasks.add.delay(0, 0).get(timeout=T) == 0
    assert body.state == states.SUCCESS
    assert len(seen.wait_for("body")) == 1


def test_a_late_part_that_read_the_header_before_the_winner_deleted_it_fires_nothing(
        app: Taskframe, tasks: Any) -> None:
    """Case (c) of ``CounterChordStore.release`` (``backends.chord_counter``), interleaved
    by hand: a late copy reads the header, then the winner fires and cleans up, then the
    copy takes the claim."""
    from taskframe import signals
    from taskframe.backends.chord_counter import counter_key
    from taskframe.canvas.chord_completion import on_chord_part_return
    from taskframe.protocol.results import group_tuple, result_tuple

    class Interleaved(MemoryBackend):
        def restore_group(self, group_id: str) -> Any:
            saved = super().restore_group(group_id)
            if late.is_set() and saved is not None:
                late.clear()  # the winner finishes while the late copy reads the metas
                MemoryBackend.delete_group(self, group_id)
                self.delete_counter(counter_key(group_id))
                self.delete_counter(counter_key(group_id) + ".fired")
            return saved

    late = threading.Event()
    app._backend = Interleaved()
    sent: list[str] = []

    def record(sender: Any = None, **_: Any) -> None:
        sent.append(str(sender))

    def last_part(interleave: bool) -> None:
        group_id = str(uuid.uuid4())
        ids = [str(uuid.uuid4()) for _ in range(2)]
        for tid in ids:
            app.backend.mark_as_done(tid, 1)
        app.backend.save_group(group_id, group_tuple(group_id, [result_tuple(i) for i in ids]))
        app.backend.incr(counter_key(group_id))  # the first part already counted
        body = {**dict(tasks.ident.s()), "chord_size": 2}
        ctx = Context(id=ids[1], group=group_id, group_index=1, chord=body,
                      called_directly=False)
        if interleave:
            late.set()
        on_chord_part_return(tasks.add, ctx, states.SUCCESS, 1)
        assert app.backend.restore_group(group_id) is None
        assert _chord_counters(app) == {}  # a late copy drops the claim it took too

    signals.before_task_publish.connect(record)
    try:
        last_part(interleave=True)
        assert sent == []
        last_part(interleave=False)  # the same part without a winner before it fires
        assert sent == [tasks.ident.name]
    finally:
        signals.before_task_publish.disconnect(record)


# -- 4. several links; replaced_task_nesting -------------------------------------------


def test_several_links_go_as_one_group_and_group_links_on_their_own(tasks: Any, seen: Seen,
                                                                     worker: Worker) -> None:
    links = [tasks.note.s("first"), tasks.note.s("second"),
             group(tasks.note.s("in group"), tasks.note.s("in group"))]
    assert tasks.add.apply_async((1, 2), link=links).get(timeout=T) == 3
    (first,) = seen.wait_for("first")
    (second,) = seen.wait_for("second")
    in_group = seen.wait_for("in group", 2)
    assert first[0] == second[0] == 3 and [v for v, _ in in_group] == [3, 3]
    # Celery 5.7: the plain links share one group, the group link has its own.
    assert first[1] is not None and first[1] == second[1]
    assert in_group[0][1] == in_group[1][1] not in (None, first[1])
    tasks.add.apply_async((2, 2), link=tasks.note.s("alone")).get(timeout=T)
    assert seen.wait_for("alone") == [(4, None)]  # one link: no group


def test_links_inherit_the_priority_with_task_inherit_parent_priority(
        app: Taskframe, tasks: Any, seen: Seen, worker: Worker) -> None:
    tasks.add.apply_async((1, 1), priority=7, link=tasks.note.s("default")).get(timeout=T)
    assert seen.wait_for("default priority") == [0]
    app.conf.task_inherit_parent_priority = True
    tasks.add.apply_async((1, 1), priority=7, link=tasks.note.s("inherited")).get(timeout=T)
    assert seen.wait_for("inherited priority") == [7]


def test_replace_increments_replaced_task_nesting(tasks: Any, worker: Worker) -> None:
    assert tasks.nesting.delay(1).get(timeout=T) == [1, 0]
    assert tasks.replacer.delay(2).get(timeout=T) == [2, 1]
    assert tasks.replacer_twice.delay(3).get(timeout=T) == [3, 2]
    # The chain steps a replaced task hands over carry it too.
    assert (tasks.replacer.s(4) | tasks.nesting.s()).delay().get(timeout=T) == [[4, 1], 1]
