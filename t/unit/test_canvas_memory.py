"""Every canvas primitive and nested shapes, run by a worker on the memory transport."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest

from taskframe import Task, Taskframe, states
from taskframe.backends.memory import MemoryBackend
from taskframe.canvas import chain, chord, group
from taskframe.context import Context
from taskframe.errors import ChordError
from taskframe.worker.worker import Worker

T = 10  # seconds any one result may take


class Recorder:
    """What errbacks and bodies saw, shared with the worker's threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[str, Any]] = []
        self.event = threading.Event()

    def add(self, name: str, value: Any) -> None:
        with self.lock:
            self.calls.append((name, value))
        self.event.set()

    def wait_for(self, name: str) -> list[Any]:
        for _ in range(100):
            with self.lock:
                found = [v for n, v in self.calls if n == name]
            if found:
                return found
            self.event.wait(0.1)
            self.event.clear()
        raise AssertionError(f"{name} was never called: {self.calls}")


@pytest.fixture
def app() -> Iterator[Taskframe]:
    app = Taskframe("cm", broker=f"memory://{uuid.uuid4().hex}", backend="memory://",
                    set_as_current=False)
    yield app
    app.close()


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


@pytest.fixture
def tasks(app: Taskframe, rec: Recorder) -> Any:
    class NS:
        @app.task
        def add(x: int, y: int) -> int:
            return x + y

        @app.task
        def mul(x: int, y: int) -> int:
            return x * y

        @app.task
        def tsum(xs: list[Any]) -> int:
            return sum(_flat(xs))

        @app.task
        def ident(x: Any) -> Any:
            return x

        @app.task
        def boom(*args: Any) -> None:
            raise ValueError("boom")

        @app.task
        def on_error(request: Context, exc: BaseException, traceback: str) -> None:
            rec.add("on_error", (request.id, type(exc).__name__, str(exc)))

        @app.task
        def errback_by_id(task_id: str) -> None:
            rec.add("errback_by_id", task_id)

        @app.task(bind=True)
        def replacer(self: Task[Any, Any], x: int) -> None:
            self.replace(NS.add.s(x, 100) | NS.mul.s(2))

        @app.task(bind=True)
        def group_replacer(self: Task[Any, Any], x: int) -> None:
            self.replace(group(NS.add.s(x, 1), NS.add.s(x, 2)))

        @app.task(bind=True)
        def grower(self: Task[Any, Any], x: int) -> int:
            self.add_to_chord(NS.add.si(x, 1000))
            return x

    return NS


def _flat(value: Any) -> list[Any]:
    if isinstance(value, list):
        return [leaf for item in value for leaf in _flat(item)]
    return [value]


@pytest.fixture
def worker(app: Taskframe, tasks: Any) -> Iterator[Worker]:
    w = Worker(app, pool="threads", concurrency=4, setup_logs=False,
               install_signal_handlers=False)
    thread = threading.Thread(target=w.start, daemon=True)
    thread.start()
    yield w
    w.stop()
    thread.join(10)
    assert not thread.is_alive()


def values(result: Any) -> list[Any]:
    return [r.get(timeout=T) for r in result.results]


# -- primitives ---------------------------------------------------------------------------


def test_chain_passes_each_result_on(tasks: Any, worker: Worker) -> None:
    c = tasks.add.s(1, 2) | tasks.add.s(3) | tasks.add.si(10, 10) | tasks.mul.s(3)
    assert c.apply_async().get(timeout=T) == 60
    assert chain(tasks.add.s(1, 1), tasks.add.s(1)).delay().get(timeout=T) == 3
    assert chain(tasks.add.s(1), tasks.add.s(1)).apply_async((5,)).get(timeout=T) == 7


def test_group_returns_a_group_result(tasks: Any, worker: Worker) -> None:
    result = group(tasks.add.s(i, i) for i in range(10)).apply_async()
    assert result.get(timeout=T) == [2 * i for i in range(10)]
    assert [r.id for r in result.results] == [str(r.id) for r in result.results]


def test_chord_sends_the_body_once_with_ordered_results(app: Taskframe, tasks: Any,
                                                         worker: Worker) -> None:
    result = chord([tasks.add.s(i, i) for i in range(20)])(tasks.ident.s())
    assert result.get(timeout=T) == [2 * i for i in range(20)]
    assert chord([tasks.add.s(1, 1)], tasks.tsum.s()).apply_async().get(timeout=T) == 2
    assert (group(tasks.add.s(i, 1) for i in range(3)) | tasks.tsum.s()).delay().get(
        timeout=T) == 6


def test_chord_with_an_empty_header_sends_the_body_at_once(tasks: Any, worker: Worker) -> None:
    assert chord([], tasks.ident.s()).apply_async().get(timeout=T) == []


def test_map_starmap_and_chunks(tasks: Any, worker: Worker) -> None:
    assert tasks.ident.map([1, 2, 3]).delay().get(timeout=T) == [1, 2, 3]
    assert tasks.add.starmap([(1, 2), (3, 4)]).delay().get(timeout=T) == [3, 7]
    result = tasks.add.chunks([(i, i) for i in range(7)], 3).apply_async()
    assert result.get(timeout=T) == [[0, 2, 4], [6, 8, 10], [12]]


def test_link_sends_a_callback_with_the_result(app: Taskframe, tasks: Any, rec: Recorder,
                                               worker: Worker) -> None:
    callback_id = str(uuid.uuid4())
    tasks.add.apply_async((1, 2), link=tasks.mul.s(10).set(task_id=callback_id))
    assert app.AsyncResult(callback_id).get(timeout=T) == 30


def test_link_error_calls_errbacks_with_request_or_task_id(tasks: Any, rec: Recorder,
                                                           worker: Worker) -> None:
    result = tasks.boom.apply_async(link_error=[tasks.on_error.s(), tasks.errback_by_id.s()])
    with pytest.raises(ValueError):
        result.get(timeout=T)
    assert rec.wait_for("on_error") == [(result.id, "ValueError", "boom")]
    assert rec.wait_for("errback_by_id") == [result.id]


def test_replace_takes_over_the_id_and_the_chain(tasks: Any, worker: Worker) -> None:
    assert tasks.replacer.delay(1).get(timeout=T) == 202
    c = tasks.replacer.s(1) | tasks.add.s(1)
    assert c.delay().get(timeout=T) == 203
    assert chord([tasks.replacer.s(1), tasks.add.s(1, 1)], tasks.ident.s()).delay().get(
        timeout=T) == [202, 2]
    assert (tasks.group_replacer.s(10) | tasks.tsum.s()).delay().get(timeout=T) == 23


def test_add_to_chord_extends_the_header(tasks: Any, worker: Worker) -> None:
    result = chord([tasks.grower.s(1), tasks.add.s(2, 2)], tasks.ident.s()).delay()
    assert sorted(result.get(timeout=T)) == [1, 4, 1001]


# -- errors -------------------------------------------------------------------------------


def test_failed_header_task_fails_the_body_with_chord_error(app: Taskframe, tasks: Any,
                                                            rec: Recorder,
                                                            worker: Worker) -> None:
    body = tasks.tsum.s().on_error(tasks.on_error.s())
    result = chord([tasks.add.s(1, 1), tasks.boom.s(), tasks.add.s(2, 2)], body).delay()
    with pytest.raises(ChordError, match="boom"):
        result.get(timeout=T)
    assert result.state == states.FAILURE
    (seen,) = rec.wait_for("on_error")
    assert seen[0] == result.id and seen[1] == "ChordError"


def test_failed_link_stops_the_chain_and_calls_its_errbacks(app: Taskframe, tasks: Any,
                                                            rec: Recorder,
                                                            worker: Worker) -> None:
    c = tasks.add.s(1, 1) | tasks.boom.s() | tasks.add.s(1) | tasks.add.s(1)
    c.link_error(tasks.on_error.s())
    result = c.apply_async()
    with pytest.raises(ValueError, match="boom"):
        result.get(timeout=T)  # the steps that never ran are failed too: no hang
    (seen,) = rec.wait_for("on_error")
    assert seen[1:] == ("ValueError", "boom")
    assert app.AsyncResult(seen[0]).state == states.FAILURE


def test_chord_without_a_backend_counter_falls_back_to_polling(tasks: Any) -> None:
    class NoCounter(MemoryBackend):
        implements_incr: ClassVar[bool] = False

    app = tasks.add.app
    app._backend = NoCounter()
    app.conf.result_chord_retry_interval = 0.05
    w = Worker(app, pool="threads", concurrency=2, setup_logs=False,
               install_signal_handlers=False)
    thread = threading.Thread(target=w.start, daemon=True)
    thread.start()
    try:
        result = chord([tasks.add.s(i, i) for i in range(4)], tasks.ident.s()).delay()
        assert result.get(timeout=T) == [0, 2, 4, 6]
    finally:
        w.stop()
        thread.join(10)


# -- nested shapes ------------------------------------------------------------------------

NESTED: list[tuple[str, Any, Any]] = [
    ("chain of groups",
     lambda t: chain(group(t.add.s(1, 1), t.add.s(2, 2)), group(t.tsum.s(), t.tsum.s())),
     [6, 6]),
    ("chord inside a chain",
     lambda t: chain(t.add.s(1, 1), chord([t.add.s(i) for i in range(3)], t.tsum.s()),
                     t.mul.s(10)),
     90),
    ("group of chains",
     lambda t: group(t.add.s(1, 1) | t.mul.s(3), t.add.s(2, 2) | t.mul.s(3)),
     [6, 12]),
    ("chord of chords (header)",
     lambda t: chord([chord([t.add.s(1, 1), t.add.s(2, 2)], t.tsum.s()),
                      chord([t.add.s(3, 3)], t.tsum.s())], t.ident.s()),
     [6, 6]),
    ("chord whose body is a chord",
     lambda t: chord([t.add.s(1, 1), t.add.s(2, 2)],
                     chord([t.tsum.s(), t.tsum.s()], t.tsum.s())),
     12),
    ("chord with a group body",
     lambda t: chord([t.add.s(1, 1), t.add.s(2, 2)], group(t.tsum.s(), t.tsum.s())),
     [6, 6]),
    ("chord with a chain body",
     lambda t: chord([t.add.s(1, 1), t.add.s(2, 2)], t.tsum.s() | t.mul.s(2)),
     12),
    ("chord of chains",
     lambda t: chord([t.add.s(1, 1) | t.mul.s(2), t.add.s(2, 2) | t.mul.s(2)], t.ident.s()),
     [4, 8]),
    ("chain ending in a group",
     lambda t: t.add.s(1, 1) | group(t.mul.s(2), t.mul.s(3)),
     [4, 6]),
    ("group inside a chord header",
     lambda t: chord([group(t.add.s(1, 1), t.add.s(2, 2)), t.add.s(3, 3)], t.ident.s()),
     [2, 4, 6]),
    ("chain of chords",
     lambda t: chain(chord([t.add.s(1, 1)], t.tsum.s()), chord([t.add.s(1), t.add.s(2)],
                                                               t.tsum.s())),
     7),
    ("group of chords",
     lambda t: group(chord([t.add.s(1, 1)], t.tsum.s()), chord([t.add.s(2, 2)], t.tsum.s())),
     [2, 4]),
    ("chain inside a chain",
     lambda t: chain(t.add.s(1, 1), chain(t.add.s(1), t.add.s(1)), t.mul.s(2)),
     8),
]


@pytest.mark.parametrize(("build", "expected"), [(b, e) for _, b, e in NESTED],
                         ids=[name for name, _, _ in NESTED])
def test_nested_shapes(tasks: Any, worker: Worker, build: Any, expected: Any) -> None:
    result = build(tasks).apply_async()
    if hasattr(result, "results"):
        assert values(result) == expected
    else:
        assert result.get(timeout=T) == expected


def test_eager_mode_runs_canvases_here(app: Taskframe, tasks: Any) -> None:
    app.conf.task_always_eager = True
    assert (tasks.add.s(1, 1) | tasks.mul.s(3)).delay().get() == 6
    assert chord([tasks.add.s(1, 1), tasks.add.s(2, 2)], tasks.tsum.s()).delay().get() == 6
    assert group(tasks.add.s(1, 1), tasks.add.s(2, 2)).delay().get() == [2, 4]


def test_a_part_counted_twice_does_not_fire_the_body_early_or_twice(app: Taskframe,
                                                                     tasks: Any,
                                                                     rec: Recorder) -> None:
    @app.task
    def body(values: list[int]) -> list[int]:
        rec.add("body", values)
        return values

    ids = [str(uuid.uuid4()) for _ in range(3)]
    header = group(tasks.add.s(i, i).set(task_id=ids[i]) for i in range(3))
    header.set(task_id=str(uuid.uuid4()))
    sig = body.s().set(task_id=str(uuid.uuid4()))
    # A redelivered copy of the first header task runs before the chord's own messages:
    # the counter reaches the header size one part early.
    tasks.add.apply_async((0, 0), task_id=ids[0], group_id=header.id, group_index=0,
                          chord={**dict(sig), "chord_size": 3})
    result = chord(header, sig).delay()
    w = Worker(app, pool="solo", setup_logs=False, install_signal_handlers=False)
    thread = threading.Thread(target=w.start, daemon=True)
    thread.start()
    try:
        assert result.get(timeout=T) == [0, 2, 4]
        assert tasks.add.delay(0, 0).get(timeout=T) == 0  # solo: every message before it ran
        assert rec.wait_for("body") == [[0, 2, 4]]
    finally:
        w.stop()
        thread.join(10)
