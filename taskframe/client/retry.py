"""``Task.retry``'s send: the next run of a task, with the same id and everything it carries."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from taskframe.context import Context

if TYPE_CHECKING:
    from taskframe.client.task import Task

__all__ = ["publish_retry"]


def publish_retry(task: Task[Any, Any], request: Context, args: Sequence[Any] | None,
                  kwargs: dict[str, Any] | None, *, eta: datetime | None,
                  countdown: float | None, **options: Any) -> None:
    """Send the next run of a retried task: same id, ``retries + 1``, same embed."""
    info = request.delivery_info
    queue = options.pop("queue", None) or info.get("queue")
    if not queue and not info.get("exchange"):
        queue = info.get("routing_key")  # the default exchange routes by queue name
    if not queue and info.get("exchange"):
        options.setdefault("exchange", info["exchange"])
        options.setdefault("routing_key", info.get("routing_key"))
    task.app.send_task(
        task.name,
        list(request.args if args is None else args),
        dict(request.kwargs if kwargs is None else kwargs),
        task_id=request.id, retries=request.retries + 1, countdown=countdown, eta=eta,
        expires=request.expires, link=request.callbacks, link_error=request.errbacks,
        chain=request.chain, chord=request.chord, group_id=request.group,
        group_index=request.group_index, root_id=request.root_id, parent_id=request.id,
        priority=request.priority, time_limit=request.timelimit[0],
        soft_time_limit=request.timelimit[1], shadow=request.shadow,
        ignore_result=request.ignore_result, queue=queue, task=task,
        reply_to=options.pop("reply_to", None) or request.reply_to, **options,
    )
