"""Remote-control handlers: Celery's inspect and control commands, on a ``WorkerState``.

Each handler is ``handler(state, **arguments) -> reply value``, registered in
``HANDLERS`` under the method name Celery sends. Arguments the handler does not
know are ignored (newer clients send more). ``NO_REPLY`` (from ``shutdown``)
means no reply is sent. Reply shapes follow Celery 5.7 (``{"ok": ...}``,
``{"error": ...}``, request-info lists).
"""

from __future__ import annotations

import logging
import os
import platform
import signal as signals_module
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from taskframe.control.revoked import mark_revoked, revoked_ids
from taskframe.control_server.contract import WorkerState
from taskframe.control_server.info import (
    broker_info,
    iso,
    jsonable,
    queue_info,
    rusage,
    scheme,
    secret,
)
from taskframe.transport import Exchange, Queue

__all__ = ["HANDLERS", "NO_REPLY", "Handler", "dispatch", "signal_number"]

logger = logging.getLogger("taskframe.control.panel")

NO_REPLY = object()
DEFAULT_TASK_INFO_ITEMS = ("exchange", "routing_key", "rate_limit")
#: The timer priority Celery reports for scheduled requests.
SCHEDULED_PRIORITY = 6


@dataclass(frozen=True)
class Handler:
    """One command: its function and whether it is an ``inspect`` or ``control`` command."""

    fn: Callable[..., Any]
    kind: str  # "inspect" or "control"
    args: tuple[str, ...] = ()  # positional CLI arguments, in order


HANDLERS: dict[str, Handler] = {}


def _command(kind: str, *args: str, name: str | None = None
             ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        HANDLERS[name or fn.__name__.rstrip("_")] = Handler(fn, kind, args)
        return fn
    return register


def ok(value: Any) -> dict[str, Any]:
    """A success reply."""
    return {"ok": value}


def error(value: str) -> dict[str, Any]:
    """An error reply."""
    return {"error": value}


def dispatch(state: WorkerState, method: str, arguments: Mapping[str, Any]) -> Any:
    """Run ``method``; unknown methods and handler errors become ``{"error": repr}``."""
    handler = HANDLERS.get(method)
    if handler is None:
        return error(repr(KeyError(method)))
    try:
        return handler.fn(state, **dict(arguments))
    except Exception as exc:
        logger.exception("control command %s failed", method)
        return error(repr(exc))


def signal_number(name: str | int | None) -> int:
    """``"KILL"``, ``"SIGKILL"``, ``9`` or ``None`` (SIGTERM) as a signal number."""
    if name is None or name == "":
        return int(signals_module.SIGTERM)
    if isinstance(name, int) or str(name).isdigit():
        return int(name)
    text = str(name).upper()
    if not text.startswith("SIG"):
        text = "SIG" + text
    return int(signals_module.Signals[text])


# -- inspect ----------------------------------------------------------------------------


@_command("inspect")
def ping(state: WorkerState, **_: Any) -> Any:
    """Answer ``pong``."""
    return ok("pong")


@_command("inspect")
def active(state: WorkerState, safe: bool | None = False, **_: Any) -> Any:
    """The requests running now."""
    return [r.info(safe) for r in state.active()]


@_command("inspect")
def reserved(state: WorkerState, **_: Any) -> Any:
    """Requests received and waiting for a slot."""
    return [r.info() for r in state.reserved()]


@_command("inspect")
def scheduled(state: WorkerState, **_: Any) -> Any:
    """Requests held until their ETA."""
    return [{"eta": iso(r.eta), "priority": SCHEDULED_PRIORITY, "request": r.info()}
            for r in state.scheduled()]


@_command("inspect")
def revoked(state: WorkerState, **_: Any) -> Any:
    """The revoked task ids this worker knows."""
    return state.revoked.ids()


@_command("inspect", "taskinfoitems")
def registered(state: WorkerState, taskinfoitems: list[str] | None = None,
               builtins: bool = False, **_: Any) -> Any:
    """Registered task names, with some attributes (``name [attr=value ...]``)."""
    items = [i for i in (taskinfoitems or DEFAULT_TASK_INFO_ITEMS)
             if isinstance(i, str) and not i.startswith("_")]
    out = []
    for name, task in state.app.tasks.items():
        if name.startswith("celery.") and not builtins:
            continue
        fields = [f"{i}={getattr(task, i)}" for i in items if getattr(task, i, None) is not None]
        out.append(f"{name} [{' '.join(fields)}]" if fields else name)
    return sorted(out)


@_command("inspect")
def stats(state: WorkerState, **_: Any) -> Any:
    """Worker statistics with every key Flower reads (``broker`` and ``total`` always).

    ``health`` is taskframe's own: whether the worker is stalled, and why (Flower shows
    keys it does not know as they are)."""
    return {
        "total": state.totals(),
        "pid": os.getpid(),
        "clock": str(state.clock.value),
        "uptime": int(time.time() - state.started_at),
        "pool": state.pool_stats(),
        "broker": broker_info(state.app.broker_url,
                              dict(state.app.conf.broker_transport_options or {})),
        "prefetch_count": state.prefetch_count,
        "rusage": rusage(),
        "health": state.health(),
    }


@_command("inspect")
def active_queues(state: WorkerState, **_: Any) -> Any:
    """The task queues consumed now, as kombu describes them."""
    return [queue_info(q) for q in state.queues()]


@_command("inspect", "with_defaults")
def conf(state: WorkerState, with_defaults: bool = False, **_: Any) -> Any:
    """The settings (only those changed from the defaults unless ``with_defaults``)."""
    settings = state.app.conf
    values = dict(settings) if with_defaults else settings.changes()
    return {k: jsonable(v) for k, v in sorted(values.items())
            if not secret(k)}


@_command("inspect", "ids")
def query_task(state: WorkerState, ids: str | list[str] | None = None, **kwargs: Any) -> Any:
    """``{task_id: [state, info]}`` for the ids this worker holds."""
    wanted = set(revoked_ids(ids or kwargs.get("task_id") or []))
    out: dict[str, Any] = {}
    for where, requests in (("active", state.active()), ("reserved", state.reserved()),
                            ("scheduled", state.scheduled())):
        for r in requests:
            if r.id in wanted and r.id not in out:
                out[r.id] = [where, r.info()]
    return out


@_command("inspect")
def clock(state: WorkerState, **_: Any) -> Any:
    """The logical clock."""
    return {"clock": state.clock.value}


@_command("inspect")
def report(state: WorkerState, **_: Any) -> Any:
    """A short bug-report text: versions, platform, broker, settings changed."""
    from taskframe import __version__

    lines = [
        f"taskframe:{__version__} ({state.hostname})",
        f"python:{platform.python_version()} ({sys.implementation.name}) "
        f"platform:{platform.platform()}",
        f"broker:{broker_info(state.app.broker_url, {})['transport']} "
        f"results:{scheme(state.app.result_backend_url)}",
    ]
    lines += [f"{k}: {v!r}" for k, v in sorted(conf(state).items())]
    return ok("\n".join(lines))


@_command("inspect")
def hello(state: WorkerState, from_node: str | None = None, revoked: Any = None,
          **_: Any) -> Any:
    """Celery's mingle: merge the peer's revoked ids, reply with ours."""
    if from_node == state.hostname:
        return None
    if revoked:
        now = time.time() + state.revoked.expires
        ids = revoked.keys() if isinstance(revoked, Mapping) else revoked
        state.revoked.update({str(i): now for i in ids})
    return {"revoked": state.revoked.ids(), "clock": state.clock.value}


# -- control ----------------------------------------------------------------------------


@_command("control", "task_id")
def revoke(state: WorkerState, task_id: str | list[str] | None = None,
           terminate: bool = False, signal: str | int | None = None, **_: Any) -> Any:
    """Revoke task ids (and terminate them when running with ``terminate``)."""
    ids = set(revoked_ids(task_id or []))
    for i in ids:
        state.revoked.add(i)
    state.persist_revokes(sorted(ids))
    _mark_revoked(state, ids)
    if terminate:
        done = state.terminate(sorted(ids), signal_number(signal))
        if not done:
            return ok("terminate: tasks unknown")
        return ok("terminate: {}".format(", ".join(done)))
    return ok(f"tasks {ids} flagged as revoked")


@_command("control", "signal", "task_id")
def terminate(state: WorkerState, signal: str | int | None = None,
              task_id: str | list[str] | None = None, **_: Any) -> Any:
    """Revoke and terminate running tasks with ``signal``."""
    return revoke(state, task_id=task_id, terminate=True, signal=signal)


@_command("control", "headers")
def revoke_by_stamped_headers(state: WorkerState, headers: Mapping[str, Any] | None = None,
                              terminate: bool = False, signal: str | int | None = None,
                              **_: Any) -> Any:
    """Revoke every task carrying one of these stamps."""
    headers = dict(headers or {})
    state.revoked.add_stamps(headers)
    if not terminate:
        return ok(f"headers {headers} flagged as revoked, but not terminated")
    hits = [r.id for r in state.active() if state.revoked.matches_stamps(r.stamps)]
    if not hits:
        return ok(f"headers {headers} were not terminated")
    state.terminate(hits, signal_number(signal))
    return ok(f"headers {headers} revoked")


@_command("control", "task_name", "rate_limit")
def rate_limit(state: WorkerState, task_name: str = "", rate_limit: Any = None,
               **_: Any) -> Any:
    """Set (or with ``None``/0 disable) a task's rate limit."""
    task = state.app.tasks.get(task_name)
    if task is None:
        return error("unknown task")
    if not rate_limit or str(rate_limit).lower() == "none":
        task.rate_limit = None
        state.set_rate_limit(task_name, None)
        return ok("rate limit disabled successfully")
    text = str(rate_limit)
    number, _sep, unit = text.partition("/")
    try:
        float(number)
    except ValueError:
        return error(f"Invalid rate limit string: {ValueError(text)!r}")
    if unit and unit[0] not in "smh":
        return error(f"Invalid rate limit string: {ValueError(text)!r}")
    task.rate_limit = text
    state.set_rate_limit(task_name, text)
    return ok("new rate limit set successfully")


@_command("control", "task_name", "soft", "hard")
def time_limit(state: WorkerState, task_name: str = "", soft: float | None = None,
               hard: float | None = None, **_: Any) -> Any:
    """Set a task's soft and hard time limits (seconds)."""
    task = state.app.tasks.get(task_name)
    if task is None:
        return error("unknown task")
    task.soft_time_limit = None if soft is None else float(soft)
    task.time_limit = None if hard is None else float(hard)
    return ok("time limits set successfully")


@_command("control", "queue", "exchange", "exchange_type", "routing_key")
def add_consumer(state: WorkerState, queue: str = "", exchange: str | None = None,
                 exchange_type: str | None = None, routing_key: str | None = None,
                 **_: Any) -> Any:
    """Start consuming ``queue`` (declared with the exchange given, or Celery's default)."""
    if not queue:
        return error("queue name missing")
    if queue in {q.name for q in state.queues()}:
        return ok(f"already consuming from {queue}")
    if exchange:
        kind: Any = exchange_type or "direct"
        target = Queue(queue, Exchange(exchange, kind), routing_key=routing_key or queue)
    else:
        target = state.app.router.queue(queue)
    state.add_consumer(target)
    return ok(f"add consumer {queue}")


@_command("control", "queue")
def cancel_consumer(state: WorkerState, queue: str = "", **_: Any) -> Any:
    """Stop consuming ``queue``."""
    state.cancel_consumer(queue)
    return ok(f"no longer consuming from {queue}")


@_command("control", "n")
def pool_grow(state: WorkerState, n: int = 1, **_: Any) -> Any:
    """Add ``n`` pool slots."""
    if not state.resize_pool(int(n)):
        return error("pool_grow is not supported by this pool")
    return ok("pool will grow")


@_command("control", "n")
def pool_shrink(state: WorkerState, n: int = 1, **_: Any) -> Any:
    """Remove ``n`` pool slots."""
    if not state.resize_pool(-int(n)):
        return error("pool_shrink is not supported by this pool")
    return ok("pool will shrink")


@_command("control")
def shutdown(state: WorkerState, **_: Any) -> Any:
    """Begin a warm shutdown (no reply is sent, as with Celery)."""
    logger.warning("remote control: shutdown requested")
    state.shutdown()
    return NO_REPLY


@_command("control")
def enable_events(state: WorkerState, **_: Any) -> Any:
    """Turn task events on."""
    if state.set_events(True):
        return ok("task events already enabled")
    return ok("task events enabled")


@_command("control")
def disable_events(state: WorkerState, **_: Any) -> Any:
    """Turn task events off."""
    if not state.set_events(False):
        return ok("task events already disabled")
    return ok("task events disabled")


@_command("control")
def heartbeat(state: WorkerState, **_: Any) -> Any:
    """Send a worker heartbeat event now."""
    state.send_heartbeat()
    return None


# -- helpers ------------------------------------------------------------------------------


def _mark_revoked(state: WorkerState, ids: set[str]) -> None:
    """Store REVOKED for ids not running here whose stored state allows it (Celery 5.7)."""
    app = state.app
    if not ids or app.result_backend_url is None:
        return
    running = {r.id for r in state.active()}
    try:
        mark_revoked(app.backend, sorted(ids - running))
    except Exception as exc:
        logger.warning("revoke %s: could not store REVOKED: %r", sorted(ids), exc)
