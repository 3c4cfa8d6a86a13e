"""Events: Celery's event protocol (celeryev), sent and received.

* ``EventDispatcher`` sends events on a connection of its own (one sender thread,
  task events batched as ``task.multi``).
* ``EventReceiver`` reads them (single events and batched lists), from taskframe and
  Celery workers alike.
* ``WorkerEvents`` is what a worker sends: ``worker-online/heartbeat/offline`` and,
  with ``-E``, the ``task-*`` events, hooked to ``taskframe.signals``.
"""

from __future__ import annotations

from taskframe.events.dispatcher import EventDispatcher, events_supported
from taskframe.events.event import (
    EVENT_EXCHANGE,
    TASK_EVENT_STATES,
    LamportClock,
    event_exchange,
    make_event,
    routing_key_for,
)
from taskframe.events.monitor import EventFormatter
from taskframe.events.receiver import EventReceiver
from taskframe.events.worker_events import WorkerEvents

__all__ = [
    "EVENT_EXCHANGE",
    "TASK_EVENT_STATES",
    "EventDispatcher",
    "EventFormatter",
    "EventReceiver",
    "LamportClock",
    "WorkerEvents",
    "event_exchange",
    "events_supported",
    "make_event",
    "routing_key_for",
]
