"""How a chord ends, on the worker: each header task counts itself, the last sends the body.

``on_chord_part_return`` runs after a header task stored its outcome and counts it in the
backend's chord store (``Backend.chord_store()``). The part that completes the count (and,
on the counter path, sees every header result ready and wins a second ``incr``) gets the
results in header order and sends the body, once; the store then forgets the chord. A failed
header task fails the body with ``ChordError`` and calls the body's errbacks instead; so
does one that ends REVOKED (expired, revoked, terminated), which the worker counts with
``on_revoked``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from taskframe import states
from taskframe.backends.chord import Part
from taskframe.canvas.callbacks import fail_signature
from taskframe.canvas.signatures import Signature
from taskframe.context import Context
from taskframe.errors import ChordError, TaskRevokedError

if TYPE_CHECKING:
    from taskframe.client.app import Taskframe
    from taskframe.client.task import Task

__all__ = ["finish_chord", "on_chord_part_return", "on_revoked", "send_body_or_fail"]

logger = logging.getLogger("taskframe.chord")


def on_chord_part_return(task: Task[Any, Any], ctx: Context, state: str, value: Any) -> None:
    """Count one ended header task; the last one sends the body (or fails it)."""
    if not ctx.group or not ctx.chord:
        return
    app = task.app
    group_id = str(ctx.group)
    try:
        store = app.backend.chord_store()
        if store is None:
            return  # celery.chord_unlock polls for this chord
        size = ctx.chord.get("chord_size")
        fired = store.count_part(group_id, str(ctx.id), state, value, index=ctx.group_index,
                                 size=None if size is None else int(size))
        if fired is None:
            return
        try:
            finish_chord(app, ctx, fired.parts, shape=fired.shape)
        finally:
            store.release(group_id, fired)
    except Exception:
        logger.exception("chord %s: counting part %s failed", ctx.group, ctx.id)


def on_revoked(task: Task[Any, Any], ctx: Context, reason: str = "revoked") -> None:
    """Count a header task that ended REVOKED (expired, revoked or terminated).

    The worker calls this wherever it stores REVOKED for a request instead of
    running it to its end, after storing it, as Celery's ``mark_as_revoked``
    does: the part counts, so the body fails with ``ChordError`` instead of
    waiting forever. A no-op for a task that is not part of a chord. Revoked
    tasks call no errbacks (Celery's rule).
    """
    if ctx.group and ctx.chord:
        on_chord_part_return(task, ctx, states.REVOKED, TaskRevokedError(reason))


def finish_chord(app: Taskframe, ctx: Context | None, parts: list[Part],
                 shape: Sequence[Any] | None = None) -> None:
    """Send the body with the header's values, or fail it when a header task failed."""
    if ctx is not None and ctx.chord is not None:
        send_body_or_fail(app, ctx.chord, parts, parent=ctx, shape=shape)


def send_body_or_fail(app: Taskframe, body_dict: Mapping[str, Any], parts: list[Part],
                      parent: Context | None = None, shape: Sequence[Any] | None = None
                      ) -> None:
    """The end of a chord: the body gets the values, or ``ChordError`` if a part failed.

    ``shape`` is the header's result tuples when a Celery client saved them (its
    header holds group results): the body then gets a group's values as one list.
    """
    body = Signature.from_dict(body_dict, app=app)
    for tid, state, value in parts:
        if state in states.PROPAGATE_STATES:
            fail_signature(app, body, ChordError(f"Dependency {tid} raised {value!r}"))
            return
    family: dict[str, Any] = {}
    if parent is not None and parent.id:
        family = {"parent_id": parent.id, "root_id": parent.root_id or parent.id}
    try:
        body.apply_async((_values(parts, shape),), **family)
    except Exception as exc:
        logger.exception("chord body %s could not be sent", body.id)
        fail_signature(app, body, ChordError(f"Callback error: {exc!r}"))


def _values(parts: list[Part], shape: Sequence[Any] | None) -> list[Any]:
    """The parts' values in order, nested as ``shape`` (Celery's result tuples) says."""
    flat = [value for _, _, value in parts]
    if not shape:
        return flat
    by_id = {tid: value for tid, _, value in parts}

    def value_of(item: Any) -> Any:
        (task_id, _parent), children = item
        if children:
            return [value_of(child) for child in children]
        return by_id[task_id]

    try:
        return [value_of(item) for item in shape]
    except (KeyError, TypeError, ValueError):
        logger.warning("chord header shape %r does not match its parts: flat values", shape)
        return flat


