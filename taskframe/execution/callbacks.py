"""What a task's end sends on: its links, the next step of its chain, its chord part.

On failure: its errbacks, the chain steps that will never run (failed), its chord part.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from taskframe import states
from taskframe.canvas.callbacks import call_errbacks, fail_chain
from taskframe.canvas.chord_completion import on_chord_part_return
from taskframe.canvas.primitives import group
from taskframe.canvas.signatures import Signature
from taskframe.context import Context

if TYPE_CHECKING:
    from taskframe.client.task import Task

__all__ = ["dispatch_callbacks", "dispatch_errbacks"]


def dispatch_callbacks(task: Task[Any, Any], ctx: Context, retval: Any) -> None:
    """Send the links, then the next chain step, then count a chord part.

    Several links are sent as Celery 5.7 sends them: each group link on its own,
    the other links together as one group (so they share a ``group_id``). With
    ``task_inherit_parent_priority`` they get this task's priority.
    """
    app = task.app
    family: dict[str, Any] = {"parent_id": ctx.id, "root_id": ctx.root_id or ctx.id}
    if app.conf.task_inherit_parent_priority and ctx.priority is not None:
        family["priority"] = ctx.priority
    links = [Signature.from_dict(sig, app=app) for sig in ctx.callbacks or ()]
    if len(links) == 1:
        links[0].apply_async((retval,), **family)
    elif links:
        for link in links:
            if isinstance(link, group):
                link.apply_async((retval,), **family)
        others = [link for link in links if not isinstance(link, group)]
        if others:
            group(*others, app=app).apply_async((retval,), **family)
    if ctx.chain:
        remaining = list(ctx.chain)
        following = Signature.from_dict(remaining.pop(), app=app)
        following.apply_async((retval,), chain=remaining or None, **family)
    if ctx.group and ctx.chord:
        on_chord_part_return(task, ctx, states.SUCCESS, retval)


def dispatch_errbacks(task: Task[Any, Any], ctx: Context, exc: BaseException, einfo: str) -> None:
    """Call the errbacks, fail the chain steps that will never run, count a chord part."""
    call_errbacks(task.app, ctx.errbacks, ctx, exc, einfo)
    if ctx.chain:
        fail_chain(task.app, ctx.chain, exc, einfo)
    if ctx.group and ctx.chord:
        on_chord_part_return(task, ctx, states.FAILURE, exc)
