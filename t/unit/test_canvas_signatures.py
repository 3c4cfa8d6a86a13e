"""Signatures and primitives as data: Celery's dict shapes, composing, cloning (no worker)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from taskframe import Taskframe
from taskframe.canvas import (
    Signature,
    chain,
    chord,
    chunks,
    group,
    maybe_signature,
    signature,
    xmap,
    xstarmap,
)


@pytest.fixture
def app() -> Iterator[Taskframe]:
    app = Taskframe("cs", broker=f"memory://{uuid.uuid4().hex}", backend="memory://",
                    set_as_current=False)
    yield app
    app.close()


@pytest.fixture
def add(app: Taskframe) -> Any:
    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    return add


def wire(sig: Any) -> Any:
    """What a signature looks like after a trip through a JSON message."""
    return json.loads(json.dumps(sig))


def test_signature_dict_has_celerys_keys(add: Any) -> None:
    sig = add.s(2).set(queue="q")
    assert wire(sig) == {"task": add.name, "args": [2], "kwargs": {}, "options": {"queue": "q"},
                         "subtask_type": None, "immutable": False}
    assert add.si(1, 1).immutable
    assert signature(add.name, (1,), {"y": 2}, countdown=3)["options"] == {"countdown": 3}


def test_clone_prepends_arguments_like_celery(add: Any) -> None:
    sig = add.s(2)
    assert sig.clone((3,)).args == [3, 2]
    assert sig.args == [2], "clone must not change the original"
    assert add.si(1, 1).clone((5,)).args == [1, 1], "immutable ignores new arguments"
    clone = sig.clone(queue="x")
    assert clone.options == {"queue": "x"} and sig.options == {}


def test_set_link_and_link_error_accumulate(add: Any) -> None:
    sig = add.s(1)
    sig.link(add.s(10))
    sig.link(add.s(10))  # the same callback twice is kept once
    sig.link_error(add.si(0, 0))
    assert [dict(s) for s in sig.options["link"]] == [dict(add.s(10))]
    assert len(sig.options["link_error"]) == 1
    assert sig.set(immutable=True).immutable


def test_pipe_builds_chains_and_chords(add: Any) -> None:
    c = add.s(1, 2) | add.s(3) | add.s(4)
    assert isinstance(c, chain)
    assert [t.args for t in c.tasks] == [[1, 2], [3], [4]]
    assert isinstance(group(add.s(1, 1), add.s(2, 2)) | add.s(), chord)
    ch = chord([add.s(1, 1)], add.s(1)) | add.s(5)
    assert isinstance(ch, chord) and isinstance(ch.body, chain)


def test_wire_shapes_match_celery(add: Any) -> None:
    g = wire(group(add.s(1, 1), add.s(2, 2)))
    assert g["subtask_type"] == "group" and g["task"] == "celery.group"
    assert [t["args"] for t in g["kwargs"]["tasks"]] == [[1, 1], [2, 2]]
    c = wire(add.s(1, 1) | add.s(2))
    assert c["subtask_type"] == "chain" and len(c["kwargs"]["tasks"]) == 2
    ch = wire(chord([add.s(1, 1)], add.s(2)))
    assert ch["subtask_type"] == "chord"
    assert ch["kwargs"]["header"]["subtask_type"] == "group"
    assert ch["kwargs"]["body"]["args"] == [2]
    m = wire(xmap(add, [1, 2]))
    assert (m["task"], m["subtask_type"], m["immutable"]) == ("celery.map", "xmap", True)
    assert m["kwargs"]["it"] == [1, 2]
    assert wire(xstarmap(add, [(1, 2)]))["task"] == "celery.starmap"
    k = wire(chunks(add, [(1, 2)] * 5, 2))
    assert (k["task"], k["kwargs"]["n"]) == ("celery.chunks", 2)


@pytest.mark.parametrize("build", [
    lambda add: add.s(1, 2),
    lambda add: add.s(1) | add.s(2),
    lambda add: group(add.s(1, 1), add.s(1) | add.s(2)),
    lambda add: chord([add.s(1, 1), add.s(2, 2)], add.s(3)),
    lambda add: chord([chord([add.s(1, 1)], add.s(1))], group(add.s(1), add.s(2))),
    lambda add: add.chunks([(1, 1)] * 3, 2),
    lambda add: add.map([1, 2]),
    lambda add: add.starmap([(1, 2)]),
])
def test_from_dict_round_trips_every_primitive(add: Any, build: Any) -> None:
    sig = build(add)
    back = Signature.from_dict(wire(sig))
    assert type(back) is type(sig)
    assert wire(back) == wire(sig)
    assert type(maybe_signature(wire(sig))) is type(sig)


def test_celery_chord_header_as_a_list_is_read(add: Any) -> None:
    data = {"task": "celery.chord", "args": [], "options": {}, "subtask_type": "chord",
            "immutable": False,
            "kwargs": {"header": [dict(add.s(1, 1)), dict(add.s(2, 2))],
                       "body": dict(add.s(1)), "kwargs": {}}}
    sig = Signature.from_dict(data)
    assert isinstance(sig, chord)
    assert [t.args for t in sig.tasks] == [[1, 1], [2, 2]]


def test_chunks_splits_into_starmap_parts(add: Any) -> None:
    g = add.chunks([(i, i) for i in range(5)], 2).group()
    assert [t.name for t in g.tasks] == ["celery.starmap"] * 3
    assert [t.kwargs["it"] for t in g.tasks] == [[[0, 0], [1, 1]], [[2, 2], [3, 3]], [[4, 4]]]


def test_freeze_gives_ids_that_sending_keeps(add: Any) -> None:
    c = add.s(1, 1) | add.s(2)
    result = c.freeze()
    assert result.id == c.tasks[-1].id
    assert all(t.id for t in c.tasks)


def test_builtin_tasks_are_registered(app: Taskframe) -> None:
    for name in ("celery.map", "celery.starmap", "celery.chunks", "celery.chord_unlock",
                 "celery.accumulate"):
        assert name in app.tasks


def test_signature_call_runs_the_function_here(add: Any) -> None:
    assert add.s(2)(3) == 5
    assert add.s(2).type is add
