"""Task messages and exceptions against the real Celery 5.7 code, both directions."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import billiard.exceptions
import celery
import celery.exceptions
import pytest
from celery.worker.request import Request
from kombu.message import Message as KombuMessage

from taskframe import errors
from taskframe.protocol import (
    TaskMessage,
    decode_exception,
    decode_message,
    encode_exception,
    encode_task,
)
from taskframe.transport import serialization
from taskframe.transport.base import Message

pytestmark = pytest.mark.interop


class AppError(Exception):
    """An application exception both sides can find in sys.modules."""


def add(x: int, y: int, z: int = 0) -> int:
    return x + y + z


@pytest.fixture
def app() -> Iterator[celery.Celery]:
    app = celery.Celery("interop", broker="memory://", set_as_current=False)
    app.conf.task_default_queue = f"tf-{uuid.uuid4().hex[:8]}"

    app.task(name="tasks.add")(add)
    yield app
    app.close()


def capture(app: celery.Celery, **send_options: Any) -> Message:
    """Send with Celery's own client; take the raw envelope off kombu's memory broker.

    The raw envelope, not a kombu ``Message``: kombu decompresses bodies when it
    builds one, and we must see the bytes as they travel.
    """
    app.send_task("tasks.add", **send_options)
    with app.connection_for_write() as conn:
        envelope = conn.default_channel._get(app.conf.task_default_queue)
    props = envelope["properties"]
    body = envelope["body"]
    if props.get("body_encoding") == "base64":
        body = base64.b64decode(body)
    # A received message outside any broker: decode_message never settles it.
    return Message(None, body=body, delivery_tag=props.get("delivery_tag"),  # type: ignore[arg-type]
                   content_type=envelope["content-type"],
                   content_encoding=envelope["content-encoding"], headers=envelope["headers"],
                   properties=props, delivery_info=props.get("delivery_info"))


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_celery_message_decodes_here(app: celery.Celery, compression: str | None) -> None:
    eta = datetime(2031, 2, 3, 4, 5, 6, tzinfo=UTC)
    expires = datetime(2032, 1, 1, tzinfo=UTC)
    link = app.signature("tasks.cb", args=(1,))
    link_error = app.signature("tasks.err")
    received = capture(
        app, task_id="celery-id-1", args=(2, 3), kwargs={"z": 1}, eta=eta, expires=expires,
        priority=3, time_limit=30, soft_time_limit=10, shadow="shadowed", root_id="root",
        parent_id="parent", group_id="grp", group_index=1, retries=2, link=link,
        link_error=link_error, compression=compression, headers={"x-extra": "v"},
    )
    msg = decode_message(received, ["json"])
    assert (msg.id, msg.name, msg.args, msg.kwargs) == ("celery-id-1", "tasks.add", [2, 3],
                                                        {"z": 1})
    assert msg.eta == eta and msg.expires == expires
    assert (msg.time_limit, msg.soft_time_limit) == (30, 10)
    assert (msg.shadow, msg.root_id, msg.parent_id) == ("shadowed", "root", "parent")
    assert (msg.group, msg.group_index, msg.retries) == ("grp", 1, 2)
    assert msg.priority == 3 and msg.correlation_id == "celery-id-1"
    assert msg.reply_to == received.properties["reply_to"]
    assert msg.argsrepr == "(2, 3)" and msg.kwargsrepr == "{'z': 1}"
    assert msg.origin == received.headers["origin"]
    assert msg.extra_headers == {"x-extra": "v"}
    assert msg.callbacks is not None and msg.callbacks[0]["task"] == "tasks.cb"
    assert msg.callbacks[0]["args"] == [1]
    assert msg.errbacks is not None and msg.errbacks[0]["task"] == "tasks.err"
    assert msg.chain is None and msg.chord is None


def test_celery_defaults_decode_here(app: celery.Celery) -> None:
    received = capture(app, args=(1, 2))
    msg = decode_message(received, ["json"])
    assert msg.root_id == msg.id and msg.eta is None and msg.expires is None
    assert msg.priority == 0 and msg.retries == 0 and msg.stamps == {}
    assert (msg.time_limit, msg.soft_time_limit) == (None, None)


def kombu_message(msg: TaskMessage, compression: str | None = None) -> KombuMessage:
    headers, properties, body = encode_task(msg)
    ctype, cenc, data = serialization.dumps(body, "json")
    if compression:
        data, mime = serialization.compress(data, compression)
        headers["compression"] = mime
    return KombuMessage(body=data, content_type=ctype, content_encoding=cenc, headers=headers,
                        properties=properties, accept=["application/json"],
                        delivery_info={"exchange": "", "routing_key": "celery"})


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_our_message_is_accepted_by_celery_worker(app: celery.Celery,
                                                  compression: str | None) -> None:
    eta = datetime.now(UTC) + timedelta(hours=1)
    expires = datetime.now(UTC) + timedelta(hours=2)
    ours = TaskMessage(
        id="tf-id-1", name="tasks.add", args=[2, 3], kwargs={"z": 4}, eta=eta, expires=expires,
        retries=1, group="grp", group_index=0, root_id="root", parent_id="parent",
        time_limit=30.0, soft_time_limit=10.0, reply_to="reply-q", priority=7,
        callbacks=[dict(app.signature("tasks.cb"))],
    )
    km = kombu_message(ours, compression)
    request = Request(km, app=app, task=app.tasks["tasks.add"])
    assert (request.id, request.name, request.task_name) == ("tf-id-1", "tasks.add", "tasks.add")
    assert request.args == [2, 3] and request.kwargs == {"z": 4}
    assert request.eta == eta and request.expires == expires
    assert list(request.time_limits) == [30.0, 10.0]  # [hard, soft]
    assert (request.root_id, request.parent_id) == ("root", "parent")
    assert (request.group, request.group_index) == ("grp", 0)
    assert request.argsrepr == "(2, 3)" and request.kwargsrepr == "{'z': 4}"
    assert request.correlation_id == "tf-id-1" and request.reply_to == "reply-q"
    assert request.delivery_info["priority"] == 7
    assert request.request_dict["retries"] == 1
    args, kwargs, embed = km.payload
    assert embed["callbacks"][0]["task"] == "tasks.cb" and embed["chain"] is None
    # Celery's own task context is built from the same request dict.
    assert app.tasks["tasks.add"](*args, **kwargs) == 9


def test_shadow_name_is_what_celery_shows(app: celery.Celery) -> None:
    request = Request(kombu_message(TaskMessage(id="s", name="tasks.add", shadow="pretty")),
                      app=app, task=app.tasks["tasks.add"])
    assert request.name == "pretty"


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (errors.Retry("again"), celery.exceptions.Retry),
        (errors.Reject("bad", True), celery.exceptions.Reject),
        (errors.Ignore(), celery.exceptions.Ignore),
        (errors.NotRegistered("tasks.x"), celery.exceptions.NotRegistered),
        (errors.TaskRevokedError("revoked"), celery.exceptions.TaskRevokedError),
        (errors.MaxRetriesExceededError("max"), celery.exceptions.MaxRetriesExceededError),
        (errors.ChordError("dep"), celery.exceptions.ChordError),
        (errors.TimeoutError("late"), celery.exceptions.TimeoutError),
        (errors.SoftTimeLimitExceeded(), billiard.exceptions.SoftTimeLimitExceeded),
        (errors.TimeLimitExceeded(30.0), billiard.exceptions.TimeLimitExceeded),
        (errors.WorkerLostError("Worker exited prematurely"),
         billiard.exceptions.WorkerLostError),
        (ValueError("boom", 42), ValueError),
        (AppError("app"), AppError),
    ],
)
def test_exceptions_both_ways(app: celery.Celery, ours: BaseException,
                              theirs: type[BaseException]) -> None:
    read_by_celery = app.backend.exception_to_python(encode_exception(ours))
    assert type(read_by_celery) is theirs
    if isinstance(ours, errors.Retry):  # Celery's Retry keeps itself as args[0]
        assert read_by_celery.message == ours.message
    else:
        assert read_by_celery.args == ours.args
    read_here = decode_exception(app.backend.prepare_exception(read_by_celery, "json"))
    assert type(read_here) is type(ours)
    if not isinstance(ours, errors.Retry):
        assert read_here.args == ours.args


def test_celery_unknown_exception_reads_as_named_stand_in(app: celery.Celery) -> None:
    data = app.backend.prepare_exception(AppError("x"), "json")
    data["exc_module"] = "proj.not.installed.here"
    assert type(decode_exception(data)).__name__ == "AppError"
