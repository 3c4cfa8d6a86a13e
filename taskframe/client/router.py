"""Where a task message goes: ``task_queues``, ``task_routes`` and per-call options.

Precedence for the queue: the ``queue=`` option of the call, then the first
matching route, then the task's ``queue`` attribute, then
``task_default_queue``. Queue names not in ``task_queues`` are created on the
fly (``task_create_missing_queues``), as Celery does.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from taskframe.errors import ImproperlyConfigured
from taskframe.transport.entities import Exchange, Queue

__all__ = ["Route", "Router", "as_queue"]


@dataclass(frozen=True)
class Route:
    """The resolved destination of one message."""

    queue: Queue
    exchange: str
    routing_key: str


def as_queue(value: Any, *, queue_type: str = "classic",
             max_priority: int | None = None) -> Queue:
    """Our ``Queue`` from a name, our ``Queue``, or a kombu ``Queue`` (duck-typed)."""
    if isinstance(value, Queue):
        return value
    if isinstance(value, str):
        return Queue(value, queue_type=queue_type,  # type: ignore[arg-type]
                     max_priority=max_priority)
    name = getattr(value, "name", None)
    if not isinstance(name, str):
        raise ImproperlyConfigured(f"not a queue: {value!r}")
    kx = getattr(value, "exchange", None)
    exchange = None
    if kx is not None and getattr(kx, "name", None) is not None:
        exchange = Exchange(kx.name, getattr(kx, "type", "direct") or "direct")
    arguments = dict(getattr(value, "queue_arguments", None) or {})
    qtype = arguments.pop("x-queue-type", queue_type)
    prio = arguments.pop("x-max-priority", getattr(value, "max_priority", None) or max_priority)
    return Queue(name, exchange, getattr(value, "routing_key", None) or None,
                 queue_type=qtype, max_priority=prio, arguments=arguments)


RouteEntry = Mapping[str, Any] | Callable[..., Any]


class Router:
    """Resolves task names and call options to a ``Route``."""

    def __init__(self, conf: Mapping[str, Any]) -> None:
        self.default_queue_name: str = conf["task_default_queue"]
        self.queue_type: str = conf["task_default_queue_type"]
        self.max_priority: int | None = conf["task_queue_max_priority"]
        self.create_missing: bool = conf["task_create_missing_queues"]
        self.queues: dict[str, Queue] = {}
        for q in conf["task_queues"] or ():
            queue = as_queue(q, queue_type=self.queue_type, max_priority=self.max_priority)
            self.queues[queue.name] = queue
        if not self.queues:
            self.queues[self.default_queue_name] = self._default_queue(conf)
        self.routes = _compile_routes(conf["task_routes"])

    def _default_queue(self, conf: Mapping[str, Any]) -> Queue:
        name = self.default_queue_name
        exchange_name = conf["task_default_exchange"] or name
        exchange = Exchange(exchange_name, conf["task_default_exchange_type"])
        return Queue(name, exchange, conf["task_default_routing_key"] or name,
                     queue_type=self.queue_type,  # type: ignore[arg-type]
                     max_priority=self.max_priority)

    def queue(self, name: str) -> Queue:
        """The queue called ``name``, created on the fly when allowed."""
        queue = self.queues.get(name)
        if queue is None:
            if not self.create_missing:
                raise ImproperlyConfigured(
                    f"queue {name!r} is not in task_queues and task_create_missing_queues is off"
                )
            queue = Queue(name, queue_type=self.queue_type,  # type: ignore[arg-type]
                          max_priority=self.max_priority)
            self.queues[name] = queue
        return queue

    def lookup(self, name: str, args: Sequence[Any], kwargs: Mapping[str, Any],
               options: Mapping[str, Any]) -> dict[str, Any]:
        """The first matching route's options for task ``name`` (``{}`` when none)."""
        for route in self.routes:
            found = route(name, args, kwargs, options)
            if found:
                return {"queue": found} if isinstance(found, str) else dict(found)
        return {}

    def route(self, name: str, args: Sequence[Any], kwargs: Mapping[str, Any],
              options: Mapping[str, Any], task_queue: str | None = None) -> Route:
        """Resolve the destination of one message."""
        queue_opt = options.get("queue")
        routed = {} if queue_opt else self.lookup(name, args, kwargs, options)
        queue_value = queue_opt or routed.get("queue") or task_queue or self.default_queue_name
        queue = as_queue(queue_value, queue_type=self.queue_type)
        if isinstance(queue_value, str):
            queue = self.queue(queue_value)
        exchange = options.get("exchange") or routed.get("exchange")
        routing_key = options.get("routing_key") or routed.get("routing_key")
        if exchange is None and routing_key is None:
            target_exchange, target_key = queue.publish_target()
            return Route(queue, target_exchange, target_key)
        exchange_name = getattr(exchange, "name", exchange)
        if exchange_name is None:
            exchange_name = queue.bound_exchange.name
        return Route(queue, str(exchange_name), routing_key or queue.bound_routing_key)


def _compile_routes(value: Any) -> list[Callable[..., Any]]:
    if not value:
        return []
    entries: Sequence[RouteEntry] = value if isinstance(value, list | tuple) else [value]
    compiled: list[Callable[..., Any]] = []
    for entry in entries:
        if callable(entry):
            compiled.append(_call_route(entry))
        elif isinstance(entry, Mapping):
            compiled.append(_map_route(entry))
        else:
            raise ImproperlyConfigured(f"task_routes entry must be a dict or callable: {entry!r}")
    return compiled


def _call_route(fn: Callable[..., Any]) -> Callable[..., Any]:
    def route(name: str, args: Sequence[Any], kwargs: Mapping[str, Any],
              options: Mapping[str, Any]) -> Any:
        return fn(name, args, kwargs, options)
    return route


def _map_route(mapping: Mapping[Any, Any]) -> Callable[..., Any]:
    exact: dict[str, Any] = {}
    patterns: list[tuple[re.Pattern[str], Any]] = []
    for key, target in mapping.items():
        if isinstance(key, re.Pattern):
            patterns.append((key, target))
        elif any(ch in key for ch in "*?["):
            patterns.append((re.compile(fnmatch.translate(key)), target))
        else:
            exact[key] = target

    def route(name: str, args: Sequence[Any], kwargs: Mapping[str, Any],
              options: Mapping[str, Any]) -> Any:
        if name in exact:
            return exact[name]
        for pattern, target in patterns:
            if pattern.match(name):
                return target
        return None
    return route
