"""Events from an ``EventDispatcher`` reach an ``EventReceiver``: RabbitMQ and Redis."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import services

from taskframe.events import EventDispatcher, EventReceiver, event_exchange
from taskframe.transport import Connection, Exchange
from taskframe.transport.amqp import AMQPTransport

pytestmark = [pytest.mark.redis, pytest.mark.rabbitmq]


@pytest.fixture(params=["amqp", "redis"])
def broker(request: pytest.FixtureRequest) -> Iterator[tuple[str, Exchange]]:
    """A broker URL and an events exchange of this test's own (no other test's events)."""
    url = services.rabbitmq_url() if request.param == "amqp" else services.redis_url()
    name = f"tfev-{uuid.uuid4().hex[:8]}"
    yield url, event_exchange(url, name)
    services.drop_broker_names(url, exchanges=[name])


def _receiver(url: str, exchange: Exchange, routing_key: str = "#") -> EventReceiver:
    receiver = EventReceiver(Connection(url), exchange=exchange, routing_key=routing_key)
    receiver.consume()
    return receiver


def _collect(receiver: EventReceiver, count: int, timeout: float = 10.0) -> list[dict[str, object]]:
    return list(receiver.itercapture(limit=count, timeout=timeout))


def test_single_and_batched_events_arrive_with_celery_fields(
        broker: tuple[str, Exchange]) -> None:
    url, exchange = broker
    receiver = _receiver(url, exchange)
    dispatcher = EventDispatcher(Connection(url), "w1@test", exchange=exchange, linger=0.2)
    try:
        dispatcher.send("worker-online", freq=2.0, active=0, processed=0,
                        loadavg=[0.1, 0.2, 0.3], sw_ident="py-taskframe", sw_ver="1",
                        sw_sys="Linux")
        assert dispatcher.flush(10)
        ids = [str(uuid.uuid4()) for _ in range(5)]
        for task_id in ids:
            dispatcher.send("task-started", uuid=task_id)
        assert dispatcher.flush(10)
        events = _collect(receiver, 6)
    finally:
        dispatcher.close()
        receiver.close()
    online = events[0]
    assert online["type"] == "worker-online"
    for key in ("hostname", "timestamp", "utcoffset", "pid", "clock", "local_received",
                "freq", "active", "processed", "loadavg", "sw_ident", "sw_ver", "sw_sys"):
        assert key in online, key
    assert online["hostname"] == "w1@test"
    assert [e["uuid"] for e in events[1:]] == ids
    clocks = [e["clock"] for e in events]
    assert clocks == sorted(clocks)
    # The five task events came together: fewer messages than events (task.multi).
    assert dispatcher.sent < 6


def test_receiver_binding_filters_by_routing_key(broker: tuple[str, Exchange]) -> None:
    url, exchange = broker
    receiver = _receiver(url, exchange, routing_key="worker.#")
    dispatcher = EventDispatcher(Connection(url), "w2@test", exchange=exchange,
                                 buffer_groups=())
    try:
        dispatcher.send("task-received", uuid="x", name="t")
        dispatcher.send("worker-heartbeat", freq=2.0)
        assert dispatcher.flush(10)
        events = _collect(receiver, 1)
        events += list(receiver.itercapture(timeout=0.5))
    finally:
        dispatcher.close()
        receiver.close()
    assert [e["type"] for e in events] == ["worker-heartbeat"]


def test_events_without_receiver_are_dropped_quietly(broker: tuple[str, Exchange]) -> None:
    url, exchange = broker
    dispatcher = EventDispatcher(Connection(url), "w3@test", exchange=exchange)
    try:
        dispatcher.send("worker-heartbeat", freq=2.0)
        assert dispatcher.flush(10)
        dispatcher.send("worker-heartbeat", freq=2.0)
        assert dispatcher.flush(10)
    finally:
        dispatcher.close()
    assert dispatcher.sent == 2


def test_dispatcher_reconnects_after_the_broker_closes_its_connection() -> None:
    sys.path.insert(0, str(Path(__file__).parent / "amqpproj"))
    import amqp_admin

    url = services.rabbitmq_url()
    name = f"tfev-{uuid.uuid4().hex[:8]}"
    exchange = event_exchange(url, name)
    receiver = _receiver(url, exchange)
    client_name = f"tfevdrop-{uuid.uuid4().hex[:8]}"
    dispatcher = EventDispatcher(Connection(url, transport_options={"client_name": client_name}),
                                 "w4@test", exchange=exchange)
    try:
        dispatcher.send("worker-online", freq=2.0)
        assert dispatcher.flush(10)
        assert _collect(receiver, 1)[0]["type"] == "worker-online"
        assert amqp_admin.close_connections(client_name) == 1
        dispatcher.send("worker-heartbeat", freq=2.0)
        assert dispatcher.flush(10)
        assert [e["type"] for e in _collect(receiver, 1)] == ["worker-heartbeat"]
    finally:
        dispatcher.close()
        receiver.close()
        with Connection(url) as conn:
            conn.connect()
            transport = conn.transport
            assert isinstance(transport, AMQPTransport)
            transport.delete_exchange(name)
