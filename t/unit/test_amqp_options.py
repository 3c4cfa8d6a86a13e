"""The AMQP transport without a server: URLs, options, message mapping, failures to connect."""

from __future__ import annotations

import socket

import pytest

from taskframe.transport import Envelope, Queue
from taskframe.transport.amqp import AMQPTransport
from taskframe.transport.amqp_messages import DEATH_HEADERS, to_amqp
from taskframe.transport.connection import known_schemes, transport_class
from taskframe.transport.errors import BrokerConnectionError, ImproperlyConfigured


def test_schemes_and_defaults() -> None:
    assert {"amqp", "amqps", "pyamqp"} <= set(known_schemes())
    assert transport_class("amqp://h//") is AMQPTransport
    assert repr(AMQPTransport("amqp://h", {})) == "<AMQPTransport amqp://guest@h:5672//>"
    assert repr(AMQPTransport("amqps://u:p@h/vh", {})) == "<AMQPTransport amqps://u@h:5671/vh>"
    assert repr(AMQPTransport("pyamqp://u@h:1234//", {})) == "<AMQPTransport amqp://u@h:1234//>"
    assert "p@" not in repr(AMQPTransport("amqp://u:p@h//", {}))


def test_bad_options_are_refused() -> None:
    with pytest.raises(ImproperlyConfigured, match="delayed_delivery"):
        AMQPTransport("amqp://h//", {"delayed_delivery": "sometimes"})
    with pytest.raises(ImproperlyConfigured, match="classic or quorum"):
        AMQPTransport("amqp://h//", {"delayed_delivery_queue_type": "stream"})


def test_supports_delay_follows_the_option() -> None:
    assert AMQPTransport("amqp://h//", {"delayed_delivery": True}).supports_delay
    assert not AMQPTransport("amqp://h//", {"delayed_delivery": False}).supports_delay
    auto = AMQPTransport("amqp://h//", {})
    assert not auto.supports_delay, "nothing declared yet: nothing known to be quorum"
    assert not auto.can_delay("", "q")
    assert auto.can_delay("celery_delayed_delivery", "0." * 28 + "q")


def test_envelope_to_amqp_message() -> None:
    envelope = Envelope(
        b"{}",
        headers={"id": "1", "x-death": [{"count": 1}], "x-first-death-queue": "q"},
        properties={"correlation_id": "1", "priority": "3", "expiration": 60,
                    "body_encoding": "base64", "reply_to": None},
    )
    message = to_amqp(envelope)
    props = message.properties
    assert props["application_headers"] == {"id": "1"}
    assert not DEATH_HEADERS & set(props["application_headers"])
    assert props["delivery_mode"] == 2 and props["priority"] == 3
    assert props["expiration"] == "60"
    assert "body_encoding" not in props and "reply_to" not in props
    assert props["content_type"] == "application/json"
    transient = to_amqp(Envelope(b"", properties={"delivery_mode": "transient"}))
    assert transient.properties["delivery_mode"] == 1
    assert envelope.headers["x-death"] == [{"count": 1}], "the caller's envelope is not changed"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_connect_failure_is_translated() -> None:
    transport = AMQPTransport(f"amqp://127.0.0.1:{_free_port()}//", {"connect_timeout": 2})
    with pytest.raises(BrokerConnectionError, match="cannot connect"):
        transport.connect()
    assert not transport.connected
    with pytest.raises(BrokerConnectionError, match="not connected"):
        transport.publish(Envelope(b""), exchange="", routing_key="q")
    with pytest.raises(BrokerConnectionError, match="not connected"):
        transport.declare(Queue("q"))
    transport.close()  # idempotent, even never connected


def test_delivery_limit_arguments_only_for_quorum_queues() -> None:
    from taskframe.transport.amqp_failures import dead_letter_route, limit_arguments

    assert limit_arguments(Queue("c"), 5) == {}
    assert limit_arguments(Queue("q", queue_type="quorum"), None) == {}
    ours = limit_arguments(Queue("q", queue_type="quorum"), 5)
    assert ours == {"x-delivery-limit": 5, "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": "q.dead"}
    assert dead_letter_route("q", ours) == "q.dead"
    # The user's own arguments are kept: their dead-letter exchange, their limit.
    theirs = Queue("q", queue_type="quorum", arguments={"x-dead-letter-exchange": "dlx"})
    assert limit_arguments(theirs, 5) == {"x-delivery-limit": 5}
    assert dead_letter_route("q", theirs.arguments) == "dead-letter exchange 'dlx'"
    assert "x-delivery-limit" not in limit_arguments(
        Queue("q", queue_type="quorum", arguments={"x-delivery-limit": 2}), 5)
    assert dead_letter_route("q", {}) is None


def test_delivery_count_from_rabbitmqs_header_and_ours() -> None:
    import amqp

    from taskframe.transport.amqp_messages import from_amqp

    def received(headers: dict[str, object]) -> int:
        raw = amqp.Message(b"{}", application_headers=headers)
        raw.delivery_info = {"delivery_tag": 1, "routing_key": "q", "exchange": ""}
        message = from_amqp(AMQPTransport("amqp://h//", {}), raw, "q")
        assert "x-taskframe-failed-deliveries" not in message.headers
        return message.delivery_count

    assert received({}) == 1
    assert received({"x-delivery-count": 2}) == 3
    assert received({"x-taskframe-failed-deliveries": 1, "x-delivery-count": 2}) == 4
    assert received({"x-taskframe-failed-deliveries": "junk"}) == 1
    # A copy never claims RabbitMQ's count as its own.
    assert "x-delivery-count" not in to_amqp(Envelope(b"{}", headers={
        "x-delivery-count": 3})).application_headers
