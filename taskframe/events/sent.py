"""``task-sent``: the one event a client sends, when ``task_send_sent_event`` is on.

Each app gets one dispatcher (its own connection and sender thread) on first
use, named by ``app.origin`` (``gen<pid>@host`` for clients, the node name
inside a worker). Queued events are flushed when the app is garbage collected
or the interpreter exits (at most ~2 s).
"""

from __future__ import annotations

import atexit
import threading
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from taskframe.events.dispatcher import EventDispatcher, events_supported

if TYPE_CHECKING:
    from taskframe.client.app import Taskframe

__all__ = ["close_sent_dispatcher", "send_task_sent"]

_dispatchers: weakref.WeakKeyDictionary[Taskframe, EventDispatcher] = (
    weakref.WeakKeyDictionary())
_lock = threading.Lock()


def _dispatcher(app: Taskframe) -> EventDispatcher | None:
    with _lock:
        dispatcher = _dispatchers.get(app)
        if dispatcher is None:
            url = app.conf.broker_write_url or app.broker_url
            if not events_supported(url):
                return None
            dispatcher = EventDispatcher.for_app(app, app.origin, groups={"task"})
            _dispatchers[app] = dispatcher
            weakref.finalize(app, dispatcher.close, 2.0)
        return dispatcher


def send_task_sent(app: Taskframe, headers: Mapping[str, Any], *, queue: str | None,
                   exchange: str, routing_key: str) -> None:
    """Send ``task-sent`` for a task message just published with ``headers``."""
    dispatcher = _dispatcher(app)
    if dispatcher is None:
        return
    dispatcher.send(
        "task-sent",
        uuid=headers.get("id"), root_id=headers.get("root_id"),
        parent_id=headers.get("parent_id"), name=headers.get("task"),
        args=headers.get("argsrepr"), kwargs=headers.get("kwargsrepr"),
        retries=headers.get("retries", 0), eta=headers.get("eta"),
        expires=headers.get("expires"), queue=queue, exchange=exchange,
        routing_key=routing_key,
    )


def close_sent_dispatcher(app: Taskframe, timeout: float = 2.0) -> None:
    """Flush and close ``app``'s task-sent dispatcher, if it has one."""
    with _lock:
        dispatcher = _dispatchers.pop(app, None)
    if dispatcher is not None:
        dispatcher.close(timeout)


@atexit.register
def _close_all() -> None:
    with _lock:
        dispatchers = list(_dispatchers.values())
        _dispatchers.clear()
    for dispatcher in dispatchers:
        dispatcher.close(2.0)
