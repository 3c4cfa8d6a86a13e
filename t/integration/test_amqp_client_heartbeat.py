"""A client's publishing connection to RabbitMQ outlives idle periods.

Nothing services the heartbeats of a client's publishing connection while the client is
idle (no loop calls ``maintain()``): had it negotiated ``broker_heartbeat``, RabbitMQ would
close it after two missed beats and the next publish would meet a reset connection, log
"retrying" and reconnect. It negotiates none (as Celery's ``connection_for_write`` does);
the worker's consuming connection keeps ``broker_heartbeat`` (its loop services it).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator

import pytest
import services

from taskframe import Taskframe, states
from taskframe.events.dispatcher import EventDispatcher
from taskframe.protocol import ResultContext
from taskframe.transport import Queue

pytestmark = pytest.mark.rabbitmq

HEARTBEAT = 2.0
# RabbitMQ closes a connection after two missed heartbeats: idle for well over three.
IDLE = 4 * HEARTBEAT


@pytest.fixture
def app() -> Iterator[Taskframe]:
    url = services.rabbitmq_url()
    app = Taskframe("hbclient", broker=url, backend="rpc://", set_as_current=False)
    app.conf.broker_heartbeat = HEARTBEAT
    queue = f"tf-hbclient-{uuid.uuid4().hex[:10]}"
    app.conf.task_default_queue = queue
    app.origin = f"{queue}-replies"  # the rpc backend's reply queue
    try:
        yield app
    finally:
        app.close()
        services.drop_broker_names(url, queues=[queue, app.origin])


def _retries(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if "retrying" in r.getMessage() or "reconnecting" in r.getMessage()]


def test_an_idle_client_publishes_on_the_same_connection(
        app: Taskframe, caplog: pytest.LogCaptureFixture) -> None:
    app.send_task("hbclient.nothing", args=(1,))
    transport = app.producer_connection().transport
    link = transport._link.conn  # type: ignore[attr-defined]
    assert link.heartbeat == 0, "the publishing connection negotiated a heartbeat"

    time.sleep(IDLE)
    with caplog.at_level(logging.WARNING, logger="taskframe"):
        app.send_task("hbclient.nothing", args=(2,))

    assert app.producer_connection().transport is transport, "the client reconnected"
    assert transport._link.conn is link  # type: ignore[attr-defined]
    assert not _retries(caplog), caplog.text
    queue = Queue(app.conf.task_default_queue)
    with app.connection() as conn:
        conn.connect()
        assert conn.transport.queue_size(queue.name) == 2  # both arrived


def test_a_consuming_connection_keeps_broker_heartbeat(app: Taskframe) -> None:
    with app.connection() as conn:  # what the worker's consumer loop opens
        conn.connect()
        assert conn.transport._link.conn.heartbeat == HEARTBEAT  # type: ignore[attr-defined]


def test_idle_rpc_result_connections_are_not_dropped(
        app: Taskframe, caplog: pytest.LogCaptureFixture) -> None:
    """The rpc backend's publisher (a worker's results) and reply consumer (read only while a
    client waits) are idle between results: they negotiate no heartbeat either."""
    backend = app.backend
    ids = [str(uuid.uuid4()) for _ in range(2)]
    backend.on_task_call(ids[0], app.origin)
    with caplog.at_level(logging.WARNING, logger="taskframe"):
        for n, task_id in enumerate(ids):
            if n:
                time.sleep(IDLE)
            backend.store_result(task_id, n, states.SUCCESS,
                                 context=ResultContext(reply_to=app.origin,
                                                       correlation_id=task_id))
            assert backend.wait_for(task_id, timeout=10)["result"] == n
    assert not _retries(caplog), caplog.text
    publishers = backend._publishers  # type: ignore[attr-defined]
    consumer = backend._consumer  # type: ignore[attr-defined]
    assert len(publishers) == 1, "a second publishing connection was needed"
    for connection in (publishers[0], consumer.connection):
        assert connection.transport._link.conn.heartbeat == 0


def test_the_event_dispatcher_negotiates_no_heartbeat(app: Taskframe) -> None:
    dispatcher = EventDispatcher.for_app(app, "hbclient@test")
    try:
        dispatcher.connection.connect()
        assert dispatcher.connection.transport._link.conn.heartbeat == 0  # type: ignore
    finally:
        dispatcher.close()
