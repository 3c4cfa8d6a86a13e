"""The ``Message`` objects the Redis transport hands out, made from kombu envelopes.

A message taken from a list carries the tag it is held under in ``unacked`` and the
queue it was taken for. One whose envelope cannot be read (``redis_layout.decode_envelope``
refuses it) is handed on all the same, as its raw text with content type
``application/x-taskframe-unreadable``, so the consumer can reject it. A fanout message
is held by nobody: its tag (made up when the envelope has none) settles nothing.
"""

from __future__ import annotations

import logging
import uuid

from .base import Message, Transport
from .errors import DecodeError
from .redis_layout import Decoded, decode_envelope

__all__ = ["CONTENT_INVALID", "fanout_message", "list_message"]

logger = logging.getLogger("taskframe.transport.redis")

#: The content type of a message whose envelope cannot be read.
CONTENT_INVALID = "application/x-taskframe-unreadable"


def list_message(transport: Transport, tag: str, raw: str, queue: str) -> Message:
    """The message of envelope ``raw``, taken from a list of ``queue`` and held as ``tag``."""
    try:
        env = decode_envelope(raw)
    except DecodeError as exc:
        logger.error("%r: unreadable message in %r (%s); handing it on as %s",
                     transport, queue, exc, CONTENT_INVALID)
        return Message(transport, body=raw.encode("utf-8"), delivery_tag=tag,
                       content_type=CONTENT_INVALID, content_encoding="binary",
                       delivery_info={"exchange": "", "routing_key": queue, "priority": 0,
                                      "redelivered": False, "queue": queue,
                                      "delivery_count": 1})
    return Message(
        transport, body=env.body, delivery_tag=tag, content_type=env.content_type,
        content_encoding=env.content_encoding, headers=env.headers,
        properties=env.properties,
        delivery_info={"exchange": env.exchange, "routing_key": env.routing_key,
                       "priority": env.priority, "redelivered": env.redelivered,
                       "queue": queue, "delivery_count": env.failed + 1},
    )


def fanout_message(transport: Transport, queue: str, env: Decoded) -> Message:
    """The message of a fanout envelope received for ``queue`` (never redelivered)."""
    return Message(transport, body=env.body, delivery_tag=env.tag or str(uuid.uuid4()),
                   content_type=env.content_type, content_encoding=env.content_encoding,
                   headers=env.headers, properties=env.properties,
                   delivery_info={"exchange": env.exchange, "routing_key": env.routing_key,
                                  "priority": env.priority, "redelivered": False,
                                  "queue": queue})
