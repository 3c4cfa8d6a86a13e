"""Task messages: encode_task / decode_task / decode_message (celery-wire.md §1.1-1.3, §1.7)."""

from __future__ import annotations

import os
import random
import socket
import zlib
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from taskframe.errors import ContentDisallowed, DecodeError, InvalidTaskError
from taskframe.protocol import TaskMessage, decode_message, decode_task, encode_task, safe_repr
from taskframe.transport import serialization
from taskframe.transport.base import Message

CELERY_HEADERS = {
    "lang", "task", "id", "shadow", "eta", "expires", "group", "group_index", "retries",
    "timelimit", "root_id", "parent_id", "argsrepr", "kwargsrepr", "origin", "ignore_result",
    "replaced_task_nesting", "stamped_headers", "stamps",
}
SIG = {"task": "t.mul", "args": [2], "kwargs": {}, "options": {"task_id": "c1"},
       "subtask_type": None, "immutable": False}


def full_message() -> TaskMessage:
    return TaskMessage(
        id="id-1", name="t.add", args=[2, "x", [1, 2]], kwargs={"k": {"n": 1}},
        eta=datetime(2030, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
        expires=datetime(2031, 1, 1, tzinfo=UTC), retries=3, group="g-1", group_index=2,
        root_id="root-1", parent_id="parent-1", time_limit=30.0, soft_time_limit=10.0,
        shadow="shadow-name", origin="me@host", ignore_result=True, argsrepr="(2, ...)",
        kwargsrepr="{...}", replaced_task_nesting=1, stamped_headers=["s"], stamps={"s": "v"},
        callbacks=[SIG], errbacks=[SIG], chain=[SIG, SIG], chord=SIG,
        correlation_id="id-1", reply_to="reply-q", priority=5,
        extra_headers={"x-custom": "yes"},
    )


def wire_round_trip(msg: TaskMessage) -> TaskMessage:
    headers, properties, body = encode_task(msg)
    ctype, cenc, data = serialization.dumps(body, "json")
    hdrs = serialization.json_loads(serialization.json_dumps(headers))
    return decode_task(hdrs, properties, serialization.loads(data, ctype, cenc, ["json"]))


def make_message(body: bytes, headers: dict[str, Any], *, content_type: str = "application/json",
                 properties: dict[str, Any] | None = None) -> Message:
    # A received message outside any broker: decode_message never settles it.
    return Message(None, body=body, delivery_tag=1, content_type=content_type,  # type: ignore[arg-type]
                   content_encoding="utf-8", headers=headers, properties=properties or {})


# -- encode ------------------------------------------------------------------------------


def test_encode_has_every_celery_header_and_properties() -> None:
    headers, properties, body = encode_task(TaskMessage(id="a", name="t.add", args=[2, 3]))
    assert set(headers) == CELERY_HEADERS
    assert headers["lang"] == "py"
    assert headers["task"] == "t.add" and headers["id"] == "a"
    assert headers["root_id"] == "a"  # a top-level call is its own root
    assert headers["timelimit"] == [None, None]
    assert headers["eta"] is None and headers["expires"] is None
    assert headers["retries"] == 0 and headers["stamps"] == {}
    assert headers["argsrepr"] == "(2, 3)" and headers["kwargsrepr"] == "{}"
    assert headers["origin"] == f"gen{os.getpid()}@{socket.gethostname()}"
    assert properties == {"correlation_id": "a", "reply_to": "", "delivery_mode": 2,
                          "priority": 0}
    assert body == [[2, 3], {}, {"callbacks": None, "errbacks": None, "chain": None,
                                 "chord": None}]


def test_encode_full_message() -> None:
    headers, properties, body = encode_task(full_message())
    assert headers["timelimit"] == [30.0, 10.0]  # [hard, soft]
    assert headers["eta"] == "2030-01-02T03:04:05.000006+00:00"
    assert headers["expires"] == "2031-01-01T00:00:00+00:00"
    assert headers["x-custom"] == "yes"
    assert headers["shadow"] == "shadow-name" and headers["ignore_result"] is True
    assert properties["priority"] == 5 and properties["reply_to"] == "reply-q"
    assert properties["expiration"].isdigit() and int(properties["expiration"]) > 0
    assert body[2] == {"callbacks": [SIG], "errbacks": [SIG], "chain": [SIG, SIG], "chord": SIG}


def test_encode_naive_datetimes() -> None:
    naive = datetime(2030, 5, 6, 7, 8, 9)
    msg = TaskMessage(id="a", name="t", eta=naive, expires=naive)
    assert encode_task(msg)[0]["eta"] == "2030-05-06T07:08:09+00:00"
    assert encode_task(msg, utc=False)[0]["eta"] == "2030-05-06T07:08:09"
    # An aware value keeps its own offset, as Celery's isoformat() does.
    plus2 = datetime(2030, 5, 6, 7, 8, 9, tzinfo=timezone(timedelta(hours=2)))
    assert encode_task(TaskMessage(id="a", name="t", eta=plus2))[0]["eta"].endswith("+02:00")


def test_expiration_in_the_past_is_zero() -> None:
    msg = TaskMessage(id="a", name="t", expires=datetime(2000, 1, 1, tzinfo=UTC))
    assert encode_task(msg)[1]["expiration"] == "0"


def test_argsrepr_is_truncated_and_safe() -> None:
    headers = encode_task(TaskMessage(id="a", name="t", args=["x" * 5000] * 10))[0]
    assert len(headers["argsrepr"]) <= 1024

    class Nasty:
        def __repr__(self) -> str:
            raise RuntimeError("no repr for you")

    text = safe_repr([Nasty()])
    assert text.startswith("[<") and "Nasty" in text
    deep: list[Any] = [[[[["deep"]]]]]
    assert "deep" not in safe_repr(deep)  # nested beyond 3 levels is elided


# -- decode ------------------------------------------------------------------------------


def test_round_trip_through_json() -> None:
    original = full_message()
    assert wire_round_trip(original) == original


def test_decode_minimal_headers_uses_defaults() -> None:
    msg = decode_task({"id": "a", "task": "t.add"}, {}, [[1], {"k": 2}, None])
    assert (msg.id, msg.name, msg.args, msg.kwargs) == ("a", "t.add", [1], {"k": 2})
    assert msg.retries == 0 and msg.time_limit is None and msg.soft_time_limit is None
    assert msg.argsrepr == "" and msg.stamps == {} and msg.callbacks is None
    assert msg.ignore_result is None and msg.priority is None and msg.extra_headers == {}


def test_decode_naive_eta_is_utc() -> None:
    msg = decode_task({"id": "a", "task": "t", "eta": "2030-01-01T10:00:00",
                       "expires": "2030-01-01T12:00:00+02:00"}, {}, [[], {}, {}])
    assert msg.eta == datetime(2030, 1, 1, 10, tzinfo=UTC)
    assert msg.expires == datetime(2030, 1, 1, 10, tzinfo=UTC)


def test_decode_keeps_unknown_headers_but_not_compression() -> None:
    headers = {"id": "a", "task": "t", "x-trace": "abc", "compression": "application/x-gzip"}
    assert decode_task(headers, {}, [[], {}, {}]).extra_headers == {"x-trace": "abc"}


def test_decode_protocol_v1() -> None:
    body = {"task": "t.add", "id": "v1", "args": [1, 2], "kwargs": {"z": 3},
            "taskset": "grp", "retries": 2, "eta": "2030-01-01T00:00:00",
            "expires": None, "utc": True, "callbacks": [SIG], "errbacks": None,
            "timelimit": [20, 5], "chord": SIG}
    msg = decode_task({}, {"correlation_id": "v1"}, body)
    assert (msg.id, msg.name, msg.args, msg.kwargs) == ("v1", "t.add", [1, 2], {"z": 3})
    assert msg.group == "grp" and msg.retries == 2
    assert (msg.time_limit, msg.soft_time_limit) == (20, 5)
    assert msg.eta == datetime(2030, 1, 1, tzinfo=UTC)
    assert msg.callbacks == [SIG] and msg.chord == SIG and msg.chain is None


def test_decode_v1_local_time_when_not_utc() -> None:
    body = {"task": "t", "id": "v1", "args": [], "kwargs": {}, "eta": "2030-01-01T00:00:00",
            "utc": False}
    expected = datetime(2030, 1, 1).astimezone().astimezone(UTC)
    assert decode_task({}, {}, body).eta == expected


def test_decode_hybrid_headers_win() -> None:
    body = {"task": "t.from_body", "id": "h1", "args": [1], "kwargs": {}, "retries": 1}
    msg = decode_task({"task": "t.from_header", "retries": 4}, {}, body)
    assert (msg.id, msg.name, msg.retries) == ("h1", "t.from_header", 4)


@pytest.mark.parametrize(
    ("headers", "body", "needle"),
    [
        ({"task": "t"}, [[], {}, {}], "'id'"),
        ({"id": "a"}, [[], {}, {}], "'task'"),
        ({"id": "", "task": "t"}, [[], {}, {}], "'id'"),
        ({"id": "a", "task": 5}, [[], {}, {}], "'task'"),
        ({"id": "a", "task": "t"}, "not a list", "3-item list"),
        ({"id": "a", "task": "t"}, [[], {}], "3-item list"),
        ({"id": "a", "task": "t"}, [[], {}, {}, {}], "3-item list"),
        ({"id": "a", "task": "t"}, None, "3-item list"),
        ({"id": "a", "task": "t"}, [{}, {}, {}], "args"),
        ({"id": "a", "task": "t"}, [[], [], {}], "kwargs"),
        ({"id": "a", "task": "t"}, [[], {}, "embed"], "embed"),
        ({"id": "a", "task": "t"}, [[], {}, {"chain": "x"}], "chain"),
        ({"id": "a", "task": "t", "eta": "tomorrow"}, [[], {}, {}], "eta"),
        ({"id": "a", "task": "t", "expires": 12}, [[], {}, {}], "expires"),
        ({"id": "a", "task": "t", "timelimit": [1]}, [[], {}, {}], "timelimit"),
        ({"id": "a", "task": "t", "timelimit": ["1", 2]}, [[], {}, {}], "timelimit"),
        ({"id": "a", "task": "t", "retries": "3"}, [[], {}, {}], "retries"),
        ({"id": "a", "task": "t", "stamps": []}, [[], {}, {}], "stamps"),
        ({}, {"id": "a", "args": []}, "'task'"),
        ({}, {"task": "t", "id": "a", "args": [], "kwargs": []}, "kwargs"),
    ],
)
def test_decode_garbage_raises_invalid_task(headers: dict[str, Any], body: Any,
                                            needle: str) -> None:
    with pytest.raises(InvalidTaskError, match=needle):
        decode_task(headers, {}, body)


# -- decode_message ----------------------------------------------------------------------


def test_decode_message_json_and_compressed() -> None:
    headers, properties, body = encode_task(full_message())
    _, _, data = serialization.dumps(body, "json")
    plain = decode_message(make_message(data, headers, properties=properties), ["json"])
    assert plain == full_message()
    zipped = decode_message(
        make_message(zlib.compress(data), {**headers, "compression": "application/x-gzip"},
                     properties=properties),
        ["json"],
    )
    assert zipped == full_message()


def test_decode_message_errors() -> None:
    headers, _, body = encode_task(TaskMessage(id="a", name="t"))
    _, _, pickled = serialization.dumps(body, "pickle")
    with pytest.raises(ContentDisallowed):
        decode_message(make_message(pickled, headers,
                                    content_type="application/x-python-serialize"), ["json"])
    with pytest.raises(DecodeError):
        decode_message(make_message(b"\xff{not json", headers), ["json"])
    with pytest.raises(DecodeError):
        decode_message(make_message(b"garbage", {**headers, "compression": "application/x-gzip"}),
                       ["json"])
    with pytest.raises(InvalidTaskError):
        decode_message(make_message(b"[1, 2]", headers), ["json"])


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(7 if depth < 3 else 4)
    if kind == 0:
        return rng.randrange(-5, 5)
    if kind == 1:
        return rng.choice(["", "a", "id", "task", "2030-01-01", None, True])
    if kind == 2:
        return None
    if kind == 3:
        return rng.random()
    if kind == 4:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(5))]
    keys = ["id", "task", "args", "kwargs", "eta", "timelimit", "retries", "chain", "utc", "x"]
    return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randrange(6))}


def test_decode_message_never_raises_anything_else() -> None:
    rng = random.Random(1234)
    outcomes = {"ok": 0, "invalid": 0, "decode": 0}
    for _ in range(2000):
        headers = _random_json(rng)
        headers = headers if isinstance(headers, dict) else {"id": "a", "task": "t"}
        if rng.random() < 0.3:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(20)))
        else:
            data = serialization.json_dumps(_random_json(rng)).encode()
        try:
            decode_message(make_message(data, headers), ["json"])
            outcomes["ok"] += 1
        except InvalidTaskError:
            outcomes["invalid"] += 1
        except DecodeError:
            outcomes["decode"] += 1
    assert outcomes["invalid"] > 0 and outcomes["decode"] > 0
