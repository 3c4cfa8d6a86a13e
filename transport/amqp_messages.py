"""Mapping between our ``Envelope``/``Message`` and py-amqp's messages, for ``amqp``.

Outgoing: the envelope's headers become AMQP application headers (minus the
``x-death`` family RabbitMQ adds when dead-lettering, and the ``x-delivery-count``
quorum queues add: a copy is a new message), its properties the AMQP
basic properties (others are dropped: they have no place in AMQP), and
``delivery_mode`` defaults to 2 (persistent).

Incoming: AMQP properties become ``Message.properties`` (content type, encoding
and application headers have their own attributes), and ``delivery_info`` holds
``exchange``, ``routing_key`` (without a delay-ladder prefix),
``delayed_routing_key`` (the key as delivered, when it had the prefix, else
None), ``redelivered``, ``priority``, ``queue``, ``consumer_tag`` and
``delivery_count``: 1, plus RabbitMQ's ``x-delivery-count`` header (quorum queues),
plus our ``x-taskframe-failed-deliveries`` header (taken out of the headers: the
count a copy published by ``requeue_failed`` carries, see ``amqp_failures``).
"""

from __future__ import annotations

from typing import Any

import amqp

from . import amqp_delayed as ndd
from .base import Envelope, Message, Transport

__all__ = ["BASIC_PROPERTIES", "DEATH_HEADERS", "DELIVERY_COUNT_HEADER", "FAILED_DELIVERIES_HEADER",
           "describe_error", "from_amqp", "to_amqp"]

PERSISTENT = 2
TRANSIENT = 1
# Headers RabbitMQ adds when dead-lettering; copied into a republish they make
# RabbitMQ < 4.0.1 see a dead-letter cycle and drop the message.
DEATH_HEADERS = frozenset({
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
})
#: Quorum queues: the failed deliveries RabbitMQ counted (before 4.3: every return).
DELIVERY_COUNT_HEADER = "x-delivery-count"
#: Ours: the failed deliveries counted before the copy was published (classic queues).
FAILED_DELIVERIES_HEADER = "x-taskframe-failed-deliveries"
BASIC_PROPERTIES = frozenset({
    "delivery_mode", "priority", "correlation_id", "reply_to", "expiration",
    "message_id", "timestamp", "type", "user_id", "app_id", "cluster_id",
})


def to_amqp(envelope: Envelope) -> Any:
    """The py-amqp message to publish for ``envelope`` (which is left unchanged)."""
    properties = {
        key: value for key, value in envelope.properties.items()
        if key in BASIC_PROPERTIES and value is not None
    }
    mode = properties.get("delivery_mode", PERSISTENT)
    if isinstance(mode, str):
        mode = TRANSIENT if mode.lower() == "transient" else PERSISTENT
    properties["delivery_mode"] = int(mode)
    if "expiration" in properties:
        properties["expiration"] = str(properties["expiration"])
    if "priority" in properties:
        properties["priority"] = int(properties["priority"])
    headers = {k: v for k, v in envelope.headers.items()
               if k not in DEATH_HEADERS and k != DELIVERY_COUNT_HEADER}
    return amqp.Message(
        envelope.body,
        content_type=envelope.content_type,
        content_encoding=envelope.content_encoding,
        application_headers=headers,
        **properties,
    )


def from_amqp(transport: Transport, raw: Any, queue: str) -> Message:
    """Our ``Message`` for a delivery ``raw`` that ``transport`` received from ``queue``."""
    info = raw.delivery_info
    routing_key = info.get("routing_key") or ""
    props = dict(raw.properties)
    headers = dict(props.pop("application_headers", None) or {})
    failed = _count(headers.pop(FAILED_DELIVERIES_HEADER, 0))
    failed += _count(headers.get(DELIVERY_COUNT_HEADER, 0))
    content_type = props.pop("content_type", None) or "application/octet-stream"
    content_encoding = props.pop("content_encoding", None) or "binary"
    body = raw.body
    if isinstance(body, str):
        body = body.encode(content_encoding if content_encoding != "binary" else "utf-8")
    return Message(
        transport,
        body=bytes(body),
        delivery_tag=info["delivery_tag"],
        content_type=content_type,
        content_encoding=content_encoding,
        headers=headers,
        properties=props,
        delivery_info={
            "exchange": info.get("exchange", ""),
            # Without the delay prefix: retries route by it, and must not stack it.
            "routing_key": ndd.strip_delay_prefix(routing_key),
            "delayed_routing_key": routing_key if ndd.has_delay_prefix(routing_key) else None,
            "redelivered": bool(info.get("redelivered")),
            "priority": int(props.get("priority") or 0),
            "queue": queue,
            "consumer_tag": info.get("consumer_tag"),
            "delivery_count": failed + 1,
        },
    )


def _count(value: Any) -> int:
    try:
        return max(0, int(value or 0))
    except (TypeError, ValueError):
        return 0


def describe_error(exc: BaseException) -> str:
    """RabbitMQ's reply (``406 PRECONDITION_FAILED - ...``) or the error's text."""
    reply = getattr(exc, "reply_text", None)
    code = getattr(exc, "code", None)
    if reply:
        return f"{code} {reply}" if code else str(reply)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
