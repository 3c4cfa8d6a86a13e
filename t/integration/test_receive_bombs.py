"""A compressed "zip bomb" off the task path (an event, a control request, an rpc reply, a
stored result) is refused at ``worker_max_message_size`` with a clear error, and the receiver
goes on with the next message. On the shared Redis, every key under a prefix of the test's.

Each bomb is valid JSON that would be accepted if it were decompressed: 4 MiB of it, about
4 KiB compressed, against a limit of 1 MiB.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import uuid
import zlib
from collections.abc import Iterator
from typing import Any

import pytest
import services
from workers import wait_until

from taskframe import Taskframe, Worker, states
from taskframe.backends._codec import COMPRESSED_MAGIC
from taskframe.errors import DecodeError
from taskframe.events import EventDispatcher, EventReceiver
from taskframe.protocol import ResultContext
from taskframe.transport import Envelope, Exchange
from taskframe.transport.producer import Producer

pytestmark = pytest.mark.redis

LIMIT = 1024 * 1024
PAD = 4 * LIMIT
REFUSED = f"application/x-gzip body decompresses to more than {LIMIT} bytes"


def bomb(payload: dict[str, Any]) -> bytes:
    """``payload`` padded to 4 MiB of JSON, gzip-compressed (a few KiB)."""
    data = json.dumps({**payload, "pad": "0" * PAD}).encode()
    assert len(data) > PAD
    return zlib.compress(data, 9)


def envelope(body: bytes, **properties: Any) -> Envelope:
    return Envelope(body, headers={"compression": "application/x-gzip"},
                    properties=properties)


def send(app: Taskframe, body: Envelope, *, exchange: Exchange | None = None,
         routing_key: str = "") -> None:
    """Publish ``body`` as it is (``exchange`` declared first: fanout on Redis is pub/sub)."""
    connection = app.connection()
    try:
        if exchange is not None:
            connection.transport.declare_exchange(exchange)
        Producer(connection).send(body, exchange=exchange.name if exchange else "",
                                  routing_key=routing_key)
    finally:
        connection.close()


@pytest.fixture
def app() -> Iterator[Taskframe]:
    prefix = f"tfbomb{uuid.uuid4().hex[:8]}."
    app = Taskframe("bombs", broker=services.redis_url(), backend=services.redis_url(),
                    set_as_current=False)
    app.conf.broker_transport_options = {"global_keyprefix": prefix}
    app.conf.result_backend_transport_options = {"global_keyprefix": prefix}
    app.conf.task_default_queue = f"{prefix}tasks"
    app.conf.control_exchange = f"{prefix}ctl"
    app.conf.event_exchange = f"{prefix}ev"
    app.conf.worker_max_message_size = LIMIT
    yield app
    app.close()
    services.redis_delete_prefix(0, prefix)


def test_an_event_bomb_is_refused_and_the_receiver_goes_on(
        app: Taskframe, caplog: pytest.LogCaptureFixture) -> None:
    receiver = EventReceiver.for_app(app)
    receiver.consume()
    dispatcher = EventDispatcher(app.connection(), "w1@test", exchange=receiver.exchange)
    try:
        send(app, envelope(bomb({"type": "worker-bomb", "hostname": "x"})),
             exchange=receiver.exchange, routing_key="worker.bomb")
        dispatcher.send("worker-online", freq=2.0)
        assert dispatcher.flush(10)
        with caplog.at_level(logging.WARNING, "taskframe.events"):
            events = list(receiver.itercapture(limit=1, timeout=10))
    finally:
        dispatcher.close()
        receiver.close()
    assert [e["type"] for e in events] == ["worker-online"]
    assert f"events: unreadable event message ({REFUSED})" in caplog.text


def test_a_control_request_bomb_is_dropped_and_the_node_still_answers(
        app: Taskframe, caplog: pytest.LogCaptureFixture) -> None:
    node = f"bombs@{socket.gethostname()}"
    worker = Worker(app, hostname=node, pool="threads", concurrency=1, setup_logs=False,
                    install_signal_handlers=False)
    thread = threading.Thread(target=worker.start, daemon=True)
    with caplog.at_level(logging.WARNING, "taskframe.control.node"):
        thread.start()
        try:
            wait_until(lambda: app.control.ping(destination=[node], timeout=1), 30,
                       "the node to answer")
            request = {"method": "ping", "arguments": {}, "destination": None}
            send(app, envelope(bomb(request)), exchange=app.control.mailbox.exchange)
            assert app.control.ping(destination=[node], timeout=5) == [
                {node: {"ok": "pong"}}]
        finally:
            worker.stop()
            thread.join(30)
    assert not thread.is_alive()
    assert f"unreadable control message dropped: {REFUSED}" in caplog.text


def test_an_rpc_reply_bomb_is_dropped_and_the_real_result_read(
        app: Taskframe, caplog: pytest.LogCaptureFixture) -> None:
    app.conf.result_backend = "rpc://"
    backend = app.backend
    task_id = str(uuid.uuid4())
    backend.on_task_call(task_id, backend.reply_to)  # declares and consumes the reply queue
    meta = {"status": states.SUCCESS, "result": "bomb", "task_id": task_id}
    send(app, envelope(bomb(meta), correlation_id=task_id), routing_key=backend.reply_to)
    backend.store_result(task_id, 42, states.SUCCESS,
                         context=ResultContext(reply_to=backend.reply_to))
    with caplog.at_level(logging.WARNING):
        assert backend.wait_for(task_id, timeout=30)["result"] == 42
    assert REFUSED in caplog.text and "dropped an unreadable reply" in caplog.text


def test_a_stored_result_bomb_is_refused_with_a_clear_error(app: Taskframe) -> None:
    backend = app.backend
    task_id = str(uuid.uuid4())
    backend.store_result(task_id, 1, states.SUCCESS)
    meta = {"status": states.SUCCESS, "result": "bomb", "task_id": task_id}
    stored = COMPRESSED_MAGIC + b"application/x-gzip\x00" + bomb(meta)  # as Celery compresses
    backend.run("test", lambda client: client.set(backend.task_key(task_id), stored))
    with pytest.raises(DecodeError, match=REFUSED):
        backend.get_task_meta(task_id)
