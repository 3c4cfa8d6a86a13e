"""``WorkerEvents``: the events one worker sends, hooked to taskframe's signals.

Worker events (``worker-online`` at start, ``worker-heartbeat`` every
``worker_heartbeat_interval`` seconds, ``worker-offline`` at stop) are sent
whenever the broker carries events (AMQP, Redis), as Celery's workers do, so
monitors see the node. Task events (``task-received``, ``-started``,
``-succeeded``, ``-failed``, ``-retried``, ``-revoked``, ``-rejected``) need
``-E`` / ``worker_send_task_events``, or the ``enable_events`` control command
(``enable_task_events()``).

The task events come from signal receivers, so they work in any pool: a
receiver only reports tasks run under this worker's node name (signals are
process-wide), never eager calls. The worker calls ``prepare()`` before its pool
starts (forked children inherit the receivers), ``start()`` after it (threads), and
``stop()`` before it closes its broker connection.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from taskframe import signals
from taskframe.context import Context, current_request
from taskframe.events.dispatcher import EventDispatcher, events_supported
from taskframe.events.event import SOFTWARE_INFO, Clock, load_average
from taskframe.protocol import safe_repr

if TYPE_CHECKING:
    from taskframe.client.app import Taskframe

__all__ = ["WorkerEvents", "send_task_event"]

logger = logging.getLogger("taskframe.events")

#: ``() -> (active, processed)``: tasks running now, tasks finished since start.
Stats = Callable[[], tuple[int, int]]

_MAX_TRACKED = 10_000

# The running nodes of this process by name, for ``Task.send_event``.
_nodes: weakref.WeakValueDictionary[str, WorkerEvents] = weakref.WeakValueDictionary()


def send_task_event(event_type: str, **fields: Any) -> dict[str, Any] | None:
    """Send a custom event about the task running here (``Task.send_event``).

    Sent as the worker running the task, with ``uuid`` = the task id, whether or not
    task events are on (as in Celery). Returns the event, or ``None`` when the task
    does not run in a worker of this process that sends events (eager calls).
    """
    ctx = current_request()
    node = _nodes.get(ctx.hostname or "") if ctx is not None and not ctx.is_eager else None
    if ctx is None or node is None or node.dispatcher is None:
        logger.debug("events: %s not sent: no worker sends events for this task", event_type)
        return None
    return node.dispatcher.send(event_type, uuid=ctx.id, **fields)


class WorkerEvents:
    """Sends the events of the worker ``hostname``.

    Args:
        app: the worker's app (broker and event settings).
        hostname: the worker's node name.
        stats: returns ``(active, processed)`` for the worker events.
        task_events: send task events from the start (``-E``); default the
            ``worker_send_task_events`` setting.
        heartbeat_interval: seconds between heartbeats; default the
            ``worker_heartbeat_interval`` setting (0 = no heartbeat thread).
        dispatcher: use this dispatcher instead of one on a new connection.
        clock: the Lamport clock to stamp events with (share the worker's, the one
            remote control uses, so replies and events agree).
    """

    def __init__(self, app: Taskframe, hostname: str, stats: Stats, *,
                 task_events: bool | None = None, heartbeat_interval: float | None = None,
                 dispatcher: EventDispatcher | None = None,
                 clock: Clock | None = None) -> None:
        conf = app.conf
        self.app = app
        self.hostname = hostname
        self.stats = stats
        if task_events is None:
            task_events = bool(conf.worker_send_task_events)
        if heartbeat_interval is None:
            heartbeat_interval = float(conf.worker_heartbeat_interval or 0)
        self.heartbeat_interval = heartbeat_interval
        self.dispatcher = dispatcher
        self.clock = clock
        # Shared memory: pool children forked from this process see enable/disable too.
        self._task_events = multiprocessing.RawValue(ctypes.c_bool, bool(task_events))
        self._started_at: dict[str, float] = {}
        # Ids received here and not finished: names failures reported outside the task.
        self._received: dict[str, None] = {}
        self._pid = os.getpid()
        self._stop = threading.Event()
        self._heart: threading.Thread | None = None
        self._connected: list[tuple[signals.Signal, Callable[..., None]]] = []
        self._prepared = False

    @property
    def task_events(self) -> bool:
        """True while task events are sent."""
        return bool(self._task_events.value) and self.dispatcher is not None

    # -- lifecycle ----------------------------------------------------------------------

    def prepare(self) -> None:
        """Make the dispatcher and connect the signal receivers; start no thread.

        A prefork pool's children are copies of this process made right after this (they
        inherit the receivers, so they send their task events), and its fork server must
        be forked while the process runs one thread: ``start()`` comes after the pool.
        """
        if self._prepared:
            return
        self._prepared = True
        if self.dispatcher is None:
            url = self.app.conf.broker_write_url or self.app.broker_url
            if not events_supported(url):
                logger.info("events: not sent over %s (AMQP and Redis carry them)",
                            url.split("://", 1)[0])
                return
            self.dispatcher = EventDispatcher.for_app(self.app, self.hostname, clock=self.clock)
        self._connect_signals()
        _nodes[self.hostname] = self

    def start(self) -> None:
        """``prepare()`` if not done, send ``worker-online``, start the heartbeat thread."""
        self.prepare()
        if self.dispatcher is None:
            return
        self._send_worker("worker-online")
        if self.heartbeat_interval > 0:
            self._heart = threading.Thread(target=self._beat, daemon=True,
                                           name=f"taskframe-heartbeat-{self.hostname}")
            self._heart.start()

    def stop(self, timeout: float = 3.0) -> None:
        """Stop the heartbeat, send ``worker-offline`` and what is queued, disconnect."""
        self._stop.set()
        for signal, receiver in self._connected:
            signal.disconnect(receiver)
        self._connected.clear()
        if self._heart is not None:
            self._heart.join(timeout)
        if self.dispatcher is not None:
            self._send_worker("worker-offline")
            self.dispatcher.close(timeout)

    def enable_task_events(self) -> bool:
        """Start sending task events; False when they already were sent."""
        if self._task_events.value:
            return False
        self._task_events.value = True
        return True

    def disable_task_events(self) -> bool:
        """Stop sending task events; False when they already were off."""
        if not self._task_events.value:
            return False
        self._task_events.value = False
        return True

    def heartbeat(self) -> None:
        """Send a ``worker-heartbeat`` now (the ``heartbeat`` control command)."""
        self._send_worker("worker-heartbeat")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_interval):
            self._send_worker("worker-heartbeat")

    def _send_worker(self, event_type: str) -> None:
        if self.dispatcher is None:
            return
        try:
            active, processed = self.stats()
        except Exception:  # the stats must never stop the heartbeat
            logger.exception("events: reading the worker's numbers failed")
            active, processed = 0, 0
        self.dispatcher.send(event_type, freq=float(self.heartbeat_interval or 2.0),
                             active=active, processed=processed, loadavg=load_average(),
                             **SOFTWARE_INFO)

    # -- task events from signals ---------------------------------------------------------

    def _connect_signals(self) -> None:
        for signal, receiver in (
            (signals.task_received, self._on_received),
            (signals.task_prerun, self._on_prerun),
            (signals.task_success, self._on_success),
            (signals.task_failure, self._on_failure),
            (signals.task_retry, self._on_retry),
            (signals.task_revoked, self._on_revoked),
            (signals.task_rejected, self._on_rejected),
            (signals.task_unknown, self._on_unknown),
            (signals.worker_process_shutdown, self._on_process_shutdown),
        ):
            signal.connect(receiver)
            self._connected.append((signal, receiver))

    def _mine(self, ctx: Context | None) -> bool:
        return (ctx is not None and not ctx.is_eager and ctx.hostname == self.hostname
                and self.task_events)

    def _send_task(self, event_type: str, ctx: Context, **fields: Any) -> None:
        assert self.dispatcher is not None
        self.dispatcher.send(event_type, uuid=ctx.id, **fields)

    def _on_received(self, sender: Any = None, request: Context | None = None,
                     **_: Any) -> None:
        if request is None or not self._mine(request):
            return
        self._received[str(request.id)] = None
        while len(self._received) > _MAX_TRACKED:
            del self._received[next(iter(self._received))]
        headers = request.headers
        argsrepr = headers.get("argsrepr")
        kwargsrepr = headers.get("kwargsrepr")
        self._send_task(
            "task-received", request,
            name=request.shadow or request.task,
            args=argsrepr if isinstance(argsrepr, str) else safe_repr(request.args),
            kwargs=kwargsrepr if isinstance(kwargsrepr, str) else safe_repr(request.kwargs),
            root_id=request.root_id, parent_id=request.parent_id, retries=request.retries,
            eta=request.eta.isoformat() if request.eta else None,
            expires=request.expires.isoformat() if request.expires else None,
        )

    def _on_prerun(self, sender: Any = None, task_id: str | None = None, **_: Any) -> None:
        ctx = current_request()
        if ctx is None or not self._mine(ctx):
            return
        self._started_at[str(ctx.id)] = time.monotonic()
        self._send_task("task-started", ctx)

    def _done(self, task_id: str) -> float | None:
        """Forget a finished task; return the seconds since it started (if known here)."""
        self._received.pop(task_id, None)
        started = self._started_at.pop(task_id, None)
        return None if started is None else time.monotonic() - started

    def _on_success(self, sender: Any = None, result: Any = None, **_: Any) -> None:
        ctx = current_request()
        if ctx is None or not self._mine(ctx):
            return
        runtime = self._done(str(ctx.id))
        self._send_task("task-succeeded", ctx, result=safe_repr(result),
                        runtime=0.0 if runtime is None else runtime)

    def _on_failure(self, sender: Any = None, task_id: str | None = None,
                    exception: BaseException | None = None, traceback: str | None = None,
                    **_: Any) -> None:
        ctx = current_request()
        if ctx is not None and (task_id is None or ctx.id == task_id):
            if not self._mine(ctx):
                return
            task_id = str(ctx.id)
        elif task_id is None or task_id not in self._received or not self.task_events:
            return  # reported outside the task (a pool child lost): only if received here
        self._done(task_id)
        assert self.dispatcher is not None
        self.dispatcher.send("task-failed", uuid=task_id, exception=safe_repr(exception),
                             traceback=traceback or "")

    def _on_retry(self, sender: Any = None, request: Context | None = None,
                  reason: Any = None, einfo: str | None = None, **_: Any) -> None:
        if request is None or not self._mine(request):
            return
        self._done(str(request.id))
        cause = getattr(reason, "exc", None)
        self._send_task("task-retried", request,
                        exception=safe_repr(cause if cause is not None else reason),
                        traceback=einfo or "")

    def _on_revoked(self, sender: Any = None, request: Context | None = None,
                    terminated: bool = False, signum: Any = None, expired: bool = False,
                    **_: Any) -> None:
        if request is None or not self._mine(request):
            return
        self._done(str(request.id))
        self._send_task("task-revoked", request, terminated=bool(terminated),
                        signum=signum, expired=bool(expired))

    def _on_rejected(self, sender: Any = None, request: Context | None = None,
                     exc: Any = None, **_: Any) -> None:
        if request is None or not self._mine(request):
            return
        self._done(str(request.id))
        self._send_task("task-rejected", request, requeue=bool(getattr(exc, "requeue", False)))

    def _on_unknown(self, sender: Any = None, name: str | None = None, id: str | None = None,
                    **_: Any) -> None:
        if getattr(sender, "hostname", None) != self.hostname or not self.task_events:
            return
        assert self.dispatcher is not None
        self.dispatcher.send("task-failed", uuid=id, exception=f"NotRegistered({name!r})")

    def _on_process_shutdown(self, sender: Any = None, **_: Any) -> None:
        # A pool child about to exit: send what it queued (its sender thread is a daemon).
        if self.dispatcher is not None and os.getpid() != self._pid:
            self.dispatcher.flush(2.0)
