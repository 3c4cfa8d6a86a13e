"""Celery's event format: the exchange, the routing keys, the common fields, the clock.

An event is a flat JSON object. Every event carries ``type`` (``group-name``,
``task-succeeded``), ``hostname`` (the sender's node name), ``timestamp``
(unix seconds, sender's clock), ``utcoffset`` (hours west of UTC, as Celery
5.7 sends it), ``pid`` and ``clock`` (a Lamport clock). Events travel on the
``celeryev`` exchange: a durable topic exchange on AMQP, a fanout exchange
(PUB/SUB) on Redis, with routing key = the type with ``-`` as ``.``. Batched
task events are one message whose body is a JSON list, routing key
``task.multi``.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Any, Protocol

from taskframe import __version__
from taskframe.clock import LamportClock
from taskframe.transport import Exchange

__all__ = [
    "EVENT_EXCHANGE",
    "SOFTWARE_INFO",
    "TASK_EVENT_STATES",
    "Clock",
    "LamportClock",
    "adjust_timestamp",
    "event_exchange",
    "group_of",
    "load_average",
    "make_event",
    "routing_key_for",
    "utcoffset",
]

EVENT_EXCHANGE = "celeryev"

#: How monitors (Celery's State, Flower) map task event types to task states.
TASK_EVENT_STATES: dict[str, str] = {
    "task-sent": "PENDING",
    "task-received": "RECEIVED",
    "task-started": "STARTED",
    "task-succeeded": "SUCCESS",
    "task-failed": "FAILURE",
    "task-retried": "RETRY",
    "task-revoked": "REVOKED",
    "task-rejected": "REJECTED",
}

#: Sent with every worker event. Flower shows these; Celery's own say ``py-celery``.
SOFTWARE_INFO: dict[str, str] = {
    "sw_ident": "py-taskframe",
    "sw_ver": __version__,
    "sw_sys": platform.system(),
}

# Transports whose fanout exchanges are PUB/SUB channels: Celery types celeryev as
# fanout there (a topic exchange would be emulated with lists nobody drains).
_FANOUT_SCHEMES = ("redis", "rediss", "redis+socket", "sentinel")


class Clock(Protocol):
    """What stamps events: a Lamport clock (the worker may share one with remote control)."""

    value: int

    def forward(self) -> int: ...

    def adjust(self, other: int) -> int: ...


def event_exchange(broker_url: str, name: str = EVENT_EXCHANGE) -> Exchange:
    """The events exchange as Celery declares it for this broker.

    Topic and durable on AMQP (a re-declaration with other flags would be refused
    by RabbitMQ); fanout on Redis.
    """
    scheme = broker_url.split("://", 1)[0].lower()
    if scheme in _FANOUT_SCHEMES:
        return Exchange(name, type="fanout")
    return Exchange(name, type="topic", durable=True)


def routing_key_for(event_type: str) -> str:
    """``task-succeeded`` -> ``task.succeeded``."""
    return event_type.replace("-", ".")


def group_of(event_type: str) -> str:
    """``task-succeeded`` -> ``task``; ``worker-online`` -> ``worker``."""
    return event_type.split("-", 1)[0]


def utcoffset() -> float:
    """This host's offset from UTC in hours, west positive (UTC+2 -> -2.0)."""
    if time.localtime().tm_isdst:
        return time.altzone / 3600
    return time.timezone / 3600


def adjust_timestamp(timestamp: float, offset: float) -> float:
    """A sender's ``timestamp`` moved into this host's local frame, as Celery's receivers do."""
    return timestamp - (offset - utcoffset()) * 3600


def load_average() -> tuple[float, float, float]:
    """The 1/5/15 minute load averages rounded up to 2 decimals (zeros where unknown)."""
    try:
        loads = os.getloadavg()
    except (AttributeError, OSError):
        return (0.0, 0.0, 0.0)
    return (_ceil2(loads[0]), _ceil2(loads[1]), _ceil2(loads[2]))


def _ceil2(value: float) -> float:
    scaled = value * 100
    whole = int(scaled)
    return (whole + (1 if scaled > whole else 0)) / 100


def make_event(event_type: str, *, hostname: str, clock: int | None, pid: int | None = None,
               timestamp: float | None = None, **fields: Any) -> dict[str, Any]:
    """One event object with the common fields Celery's receivers expect.

    Args:
        event_type: ``task-received``, ``worker-heartbeat``, ...
        hostname: the sender's node name.
        clock: the Lamport clock value (``None``: sent as null, as Celery's "blind" events).
        pid: the sender's process id (default: this process).
        timestamp: unix seconds (default: now).
        **fields: the type's own fields (``uuid``, ``result``, ``freq``, ...).
    """
    event: dict[str, Any] = dict(fields)
    event.update(
        hostname=hostname,
        utcoffset=utcoffset(),
        pid=os.getpid() if pid is None else pid,
        clock=clock,
        timestamp=time.time() if timestamp is None else timestamp,
        type=event_type,
    )
    return event
