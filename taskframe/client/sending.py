"""Sending a task: ``send_task``'s options, typed; the message they make; its publication.

``app.send_task(name, args, kwargs, **options)`` keeps Celery's signature. Inside, the
options become a ``SendOptions`` (the documented keywords and the lineage a canvas, a
retry or a chord passes along), ``compose`` turns them into a ``TaskMessage`` with the
defaults of the task and the settings applied, and ``publish_task`` encodes it, sends the
publish signals and hands it to the transport's ``Producer``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from taskframe import signals
from taskframe.context import current_request
from taskframe.events.sent import send_task_sent
from taskframe.protocol import TaskMessage, encode_task
from taskframe.transport.producer import envelope_of

if TYPE_CHECKING:
    from taskframe.client.app import Taskframe
    from taskframe.client.router import Route
    from taskframe.client.task import Task

__all__ = ["SendOptions", "compose", "publish_task", "seconds"]

#: ``send_task`` options that are not routing: taken out of ``**options`` by name.
_LINEAGE_KEYS = ("retries", "group_id", "group_index", "root_id", "parent_id", "chain",
                 "chord", "reply_to", "replaced_task_nesting", "retry", "retry_policy")


@dataclass
class SendOptions:
    """Everything ``send_task`` takes besides the task's name and arguments.

    What is left in ``routing`` (``queue``, ``exchange``, ``routing_key`` and anything
    else) goes to the router, and to ``task_routes`` functions, as Celery's options do.
    """

    countdown: float | timedelta | None = None
    eta: datetime | None = None
    expires: float | timedelta | datetime | None = None
    task_id: str | None = None
    priority: int | None = None
    headers: dict[str, Any] | None = None
    link: Any = None
    link_error: Any = None
    serializer: str | None = None
    compression: str | None = None
    ignore_result: bool | None = None
    time_limit: float | None = None
    soft_time_limit: float | None = None
    shadow: str | None = None
    # The lineage a retry, a chain step or a chord part carries on.
    retries: int = 0
    group_id: str | None = None
    group_index: int | None = None
    root_id: str | None = None
    parent_id: str | None = None
    chain: list[dict[str, Any]] | None = None
    chord: dict[str, Any] | None = None
    reply_to: str | None = None
    replaced_task_nesting: int = 0
    # Publishing.
    retry: bool | None = None
    retry_policy: dict[str, Any] | None = None
    routing: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def lineage(options: dict[str, Any]) -> dict[str, Any]:
        """Take the lineage and publishing keys out of ``options`` (the rest is routing)."""
        taken = {key: options.pop(key) for key in _LINEAGE_KEYS if key in options}
        taken["retries"] = int(taken.get("retries") or 0)
        taken["replaced_task_nesting"] = int(taken.get("replaced_task_nesting") or 0)
        return taken


def compose(app: Taskframe, name: str, args: list[Any], kwargs: dict[str, Any],
            task: Task[Any, Any] | None, opts: SendOptions) -> tuple[TaskMessage, float | None]:
    """The message ``opts`` describe, with the task's and the settings' defaults applied.

    Returns the message and the delay in seconds (``countdown``/``eta``; ``None``: none).
    """
    conf = app.conf
    task_id = opts.task_id or str(uuid.uuid4())
    now = datetime.now(UTC)
    delay = _delay_seconds(opts.countdown, opts.eta, now)
    eta = opts.eta
    if delay is not None and eta is None:
        eta = now + timedelta(seconds=delay)
    expires_at = _expires_at(opts.expires if opts.expires is not None else
                             (task.expires if task is not None else None), now)
    ignore_result, time_limit = opts.ignore_result, opts.time_limit
    soft_time_limit, priority = opts.soft_time_limit, opts.priority
    if task is not None:
        if ignore_result is None:
            ignore_result = _resolve(task.ignore_result, conf.task_ignore_result)
        if time_limit is None:
            time_limit = _resolve(task.time_limit, conf.task_time_limit)
        if soft_time_limit is None:
            soft_time_limit = _resolve(task.soft_time_limit, conf.task_soft_time_limit)
        if priority is None:
            priority = task.priority
    if priority is None:
        priority = conf.task_default_priority
    parent = current_request()
    message = TaskMessage(
        id=task_id, name=name, args=args, kwargs=kwargs, eta=eta, expires=expires_at,
        retries=opts.retries, group=opts.group_id, group_index=opts.group_index,
        root_id=opts.root_id or (parent.root_id or parent.id if parent and parent.id
                                 else task_id),
        parent_id=opts.parent_id or (parent.id if parent else None),
        time_limit=time_limit, soft_time_limit=soft_time_limit, shadow=opts.shadow,
        origin=app.origin, ignore_result=ignore_result,
        callbacks=_signatures(opts.link), errbacks=_signatures(opts.link_error),
        chain=opts.chain, chord=opts.chord, correlation_id=task_id,
        reply_to=opts.reply_to or app.origin, priority=priority,
        extra_headers=dict(opts.headers or {}),
        replaced_task_nesting=opts.replaced_task_nesting,
    )
    return message, delay


def publish_task(app: Taskframe, message: TaskMessage, route: Route, delay: float | None,
                 opts: SendOptions, task: Task[Any, Any] | None) -> None:
    """Encode ``message``, send the publish signals, and publish it where ``route`` says."""
    conf = app.conf
    headers, properties, body = encode_task(message, utc=bool(conf.enable_utc))
    signals.before_task_publish.send(
        sender=message.name, body=body, exchange=route.exchange,
        routing_key=route.routing_key, headers=headers, properties=properties,
        declare=[route.queue], retry_policy=opts.retry_policy,
    )
    serializer = opts.serializer or (task.serializer if task is not None else None)
    compression = (opts.compression or (task.compression if task is not None else None)
                   or conf.task_compression)
    properties["delivery_mode"] = _delivery_mode(conf.task_default_delivery_mode)
    policy = {**conf.task_publish_retry_policy, **(opts.retry_policy or {})}
    if not (conf.task_publish_retry if opts.retry is None else opts.retry):
        policy["max_retries"] = 0
    envelope = envelope_of(body, serializer=serializer or conf.task_serializer,
                           headers=headers, properties=properties, compression=compression)
    app.producer().send(envelope, exchange=route.exchange, routing_key=route.routing_key,
                        delay=delay, delay_if_possible=True, declare=[route.queue],
                        retry=True, retry_policy=policy)
    headers = envelope.headers  # with the compression header, as the broker got them
    signals.after_task_publish.send(sender=message.name, body=body, headers=headers,
                                    exchange=route.exchange, routing_key=route.routing_key)
    if conf.task_send_sent_event:
        send_task_sent(app, headers, queue=route.queue.name, exchange=route.exchange,
                       routing_key=route.routing_key)


def _resolve(value: Any, default: Any) -> Any:
    return default if value is None else value


def seconds(value: float | timedelta | None) -> float | None:
    """A duration in seconds (``timedelta`` accepted at the API edge); ``None`` stays."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        return value.total_seconds()
    return float(value)


def _delay_seconds(countdown: float | timedelta | None, eta: datetime | None,
                   now: datetime) -> float | None:
    if countdown is not None:
        return max(0.0, seconds(countdown) or 0.0)
    if eta is not None:
        if eta.tzinfo is None:
            eta = eta.replace(tzinfo=UTC)
        return max(0.0, (eta - now).total_seconds())
    return None


def _expires_at(expires: float | timedelta | datetime | None, now: datetime) -> datetime | None:
    if expires is None:
        return None
    if isinstance(expires, datetime):
        return expires if expires.tzinfo else expires.replace(tzinfo=UTC)
    return now + timedelta(seconds=seconds(expires) or 0.0)


def _signatures(value: Any) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    items = value if isinstance(value, list | tuple) else [value]
    return [dict(item) for item in items]


def _delivery_mode(value: Any) -> int:
    if value in ("transient", 1):
        return 1
    return 2
