"""Result metas and exception encoding (celery-wire.md §6.1-6.2, §7)."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import taskframe.backends
import taskframe.protocol
from taskframe import errors, states
from taskframe.protocol import (
    ResultContext,
    decode_exception,
    decode_result,
    encode_exception,
    flatten_ids,
    group_tuple,
    make_meta,
    result_tuple,
)


class LocalError(Exception):
    """An application exception defined in a loaded module."""

    class Inner(Exception):
        """A nested one (qualname with a dot)."""


class TwoArgError(Exception):
    def __init__(self, a: Any, b: Any) -> None:
        super().__init__(a, b)


def test_public_all_is_sorted() -> None:
    for module in (taskframe.protocol, taskframe.backends):
        assert list(module.__all__) == sorted(module.__all__)
        assert all(hasattr(module, name) for name in module.__all__)


# -- metas -------------------------------------------------------------------------------


def test_make_meta_success() -> None:
    meta = make_meta("t1", states.SUCCESS, {"x": 1})
    assert list(meta) == ["status", "result", "traceback", "children", "date_done", "task_id"]
    assert meta["result"] == {"x": 1} and meta["children"] == [] and meta["traceback"] is None
    done = datetime.fromisoformat(str(meta["date_done"]))
    assert done.tzinfo is not None and done.utcoffset() == UTC.utcoffset(None)


@pytest.mark.parametrize("state", [states.PENDING, states.STARTED, states.RETRY])
def test_make_meta_unready_has_no_date_done(state: str) -> None:
    assert make_meta("t1", state, None)["date_done"] is None


def test_make_meta_context_and_extended() -> None:
    child = result_tuple("c1")
    ctx = ResultContext(name="t.add", args=[1, 2], kwargs={"k": 3}, worker="w@h", retries=2,
                        queue="celery", group_id="g1", parent_id="p1", children=[child])
    plain = make_meta("t1", states.SUCCESS, 3, context=ctx)
    assert plain["group_id"] == "g1" and plain["parent_id"] == "p1"
    assert plain["children"] == [[["c1", None], None]]
    assert "name" not in plain
    extended = make_meta("t1", states.SUCCESS, 3, context=ctx, extended=True)
    assert (extended["name"], extended["args"], extended["kwargs"]) == ("t.add", [1, 2], {"k": 3})
    assert (extended["worker"], extended["retries"], extended["queue"]) == ("w@h", 2, "celery")
    bare = make_meta("t1", states.SUCCESS, 3, context=ResultContext())
    assert "group_id" not in bare and "parent_id" not in bare


def test_make_meta_encodes_exceptions() -> None:
    meta = make_meta("t1", states.FAILURE, ValueError("boom", 42), traceback="Traceback...")
    assert meta["result"] == {"exc_type": "ValueError", "exc_message": ["boom", 42],
                              "exc_module": "builtins"}
    assert meta["traceback"] == "Traceback..."


def test_result_and_group_tuples() -> None:
    assert result_tuple("a") == [["a", None], None]
    parent = result_tuple("p")
    assert result_tuple("a", parent) == [["a", [["p", None], None]], None]
    assert group_tuple("g", [result_tuple("a"), result_tuple("b")]) == [
        ["g", None], [[["a", None], None], [["b", None], None]]]


def test_flatten_ids_of_result_tuples() -> None:
    inner = group_tuple("inner", [result_tuple("b"), result_tuple("c")])
    header = group_tuple("g", [result_tuple("a"), inner, result_tuple("d")])
    assert flatten_ids(header) == ["a", "b", "c", "d"]  # a group's ids, nested ones in order
    assert flatten_ids(header[1]) == ["a", "b", "c", "d"]  # a list of tuples: the same
    assert flatten_ids(result_tuple("a", result_tuple("p"))) == ["a"]  # not the parent
    assert flatten_ids([]) == [] and flatten_ids(None) == [] and flatten_ids("a") == []


def test_decode_result() -> None:
    assert decode_result(make_meta("t", states.SUCCESS, [1, 2])) == [1, 2]
    # A successful value that merely looks like an exception stays a value.
    fake = {"exc_type": "ValueError", "exc_message": [], "exc_module": "builtins"}
    assert decode_result(make_meta("t", states.SUCCESS, fake)) == fake
    exc = decode_result(make_meta("t", states.FAILURE, KeyError("k")))
    assert isinstance(exc, KeyError) and exc.args == ("k",)
    retry = decode_result(make_meta("t", states.RETRY, errors.TimeLimitExceeded(30.0)))
    assert isinstance(retry, errors.TimeLimitExceeded) and retry.args == (30.0,)
    assert decode_result({"status": states.PENDING, "result": None}) is None


# -- exceptions --------------------------------------------------------------------------


def test_encode_builtin_and_local() -> None:
    assert encode_exception(ValueError("boom", 42)) == {
        "exc_type": "ValueError", "exc_message": ["boom", 42], "exc_module": "builtins"}
    encoded = encode_exception(LocalError.Inner(object))
    assert encoded["exc_type"] == "LocalError.Inner"
    assert encoded["exc_module"] == __name__
    assert encoded["exc_message"] == [repr(object)]  # not JSON: stored as its repr


@pytest.mark.parametrize(
    ("exc", "module"),
    [
        (errors.Retry("again"), "celery.exceptions"),
        (errors.Reject("bad", False), "celery.exceptions"),
        (errors.Ignore(), "celery.exceptions"),
        (errors.NotRegistered("t.x"), "celery.exceptions"),
        (errors.TaskRevokedError("revoked"), "celery.exceptions"),
        (errors.MaxRetriesExceededError("max"), "celery.exceptions"),
        (errors.ChordError("dep"), "celery.exceptions"),
        (errors.TimeoutError("late"), "celery.exceptions"),
        (errors.SoftTimeLimitExceeded(), "billiard.exceptions"),
        (errors.TimeLimitExceeded(10.0), "billiard.exceptions"),
        (errors.WorkerLostError("Worker exited prematurely: signal 9 (SIGKILL)."),
         "billiard.exceptions"),
    ],
)
def test_our_exceptions_use_celery_names_and_come_back(exc: BaseException, module: str) -> None:
    encoded = encode_exception(exc)
    assert encoded["exc_module"] == module
    assert encoded["exc_type"] == type(exc).__name__
    back = decode_exception(encoded)
    assert type(back) is type(exc)
    assert encode_exception(back) == encoded


def test_celery_reexported_billiard_names_map_to_ours() -> None:
    data = {"exc_type": "SoftTimeLimitExceeded", "exc_message": [],
            "exc_module": "celery.exceptions"}
    assert type(decode_exception(data)) is errors.SoftTimeLimitExceeded


def test_decode_loaded_classes() -> None:
    back = decode_exception(encode_exception(LocalError.Inner("x")))
    assert type(back) is LocalError.Inner and back.args == ("x",)
    assert type(decode_exception({"exc_type": "KeyError", "exc_message": "k",
                                  "exc_module": "builtins"})) is KeyError


def test_unknown_class_gets_a_cached_stand_in() -> None:
    data = {"exc_type": "Outer.PaymentDeclined", "exc_message": ["card", 3],
            "exc_module": "shop.not_installed"}
    first, second = decode_exception(data), decode_exception(data)
    assert type(first) is type(second)
    assert type(first).__name__ == "PaymentDeclined"
    assert type(first).__qualname__ == "Outer.PaymentDeclined"
    assert type(first).__module__ == "shop.not_installed"
    assert isinstance(first, Exception) and first.args == ("card", 3)
    assert "shop.not_installed" not in sys.modules


def test_constructor_refusing_stored_args_falls_back_to_stand_in() -> None:
    back = decode_exception({"exc_type": "TwoArgError", "exc_message": ["only one"],
                             "exc_module": __name__})
    assert type(back) is not TwoArgError
    assert type(back).__name__ == "TwoArgError" and back.args == ("only one",)


def test_missing_fields() -> None:
    back = decode_exception({"exc_message": ["?"]})
    assert type(back).__name__ == "UnknownException" and back.args == ("?",)


def test_security_os_system_is_never_called(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    data = {"exc_module": "os", "exc_type": "system", "exc_message": [f"touch {marker}"]}
    back = decode_exception(data)
    assert not marker.exists()
    assert type(back).__name__ == "system" and type(back).__module__ == "os"
    assert isinstance(back, Exception)


@pytest.mark.parametrize(
    ("module", "name"),
    [("builtins", "eval"), ("builtins", "dict"), ("builtins", "object.__subclasses__"),
     ("sys", "exit"), ("os", "__class__")],
)
def test_security_non_exception_objects_become_stand_ins(module: str, name: str) -> None:
    back = decode_exception({"exc_module": module, "exc_type": name,
                             "exc_message": ["print('owned')"]})
    assert type(back).__module__ == module
    assert type(back).__qualname__ == name
    assert back.args == ("print('owned')",)


def test_security_modules_are_never_imported(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "imported"
    (tmp_path / "tf_evil_module.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nclass Boom(Exception):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    back = decode_exception({"exc_module": "tf_evil_module", "exc_type": "Boom",
                             "exc_message": []})
    assert type(back).__name__ == "Boom"
    assert "tf_evil_module" not in sys.modules
    assert not marker.exists()
