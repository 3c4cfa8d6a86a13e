"""taskframe.transport: Kombu-style messaging (connections, exchanges, queues, messages).

This package imports only the standard library, its client libraries and
itself, so it can be used without the rest of taskframe::

    from taskframe.transport import Connection, Consumer, Producer, Queue

    with Connection("sqlite:///broker.sqlite3") as conn:
        Producer(conn).publish({"hello": "world"}, routing_key="jobs", declare=[Queue("jobs")])
"""

from __future__ import annotations

from . import errors
from .base import Envelope, Message, Transport
from .connection import Connection, Consumer
from .entities import Exchange, Queue
from .producer import Producer
from .serialization import dumps, loads

__all__ = [
    "Connection",
    "Consumer",
    "Envelope",
    "Exchange",
    "Message",
    "Producer",
    "Queue",
    "Transport",
    "dumps",
    "errors",
    "loads",
]
