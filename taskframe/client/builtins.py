"""Celery's built-in canvas tasks, registered on every app under Celery's names.

A canvas built by Celery may send these by name, so a taskframe worker must run
them: ``celery.map``/``celery.starmap``/``celery.chunks`` (``xmap``,
``xstarmap``, ``chunks``), ``celery.accumulate`` (the body ``replace()`` gives a
group) and ``celery.chord_unlock``, the polling chord Celery uses on result
backends without a counter (its database backend among them); taskframe itself
only sends it for a backend that has no counter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from taskframe import states
from taskframe.canvas import Signature, chunks
from taskframe.canvas.chord_completion import send_body_or_fail
from taskframe.client.task import Task
from taskframe.protocol.results import decode_result, flatten_ids

if TYPE_CHECKING:
    from taskframe.client.app import Taskframe

__all__ = ["register_builtins"]


def _task_of(app: Taskframe, sig_data: Any) -> Task[Any, Any]:
    return Signature.from_dict(sig_data, app=app).type


def _map(self: Task[Any, Any], task: Any, it: list[Any]) -> list[Any]:
    """Call ``task(item)`` once per item, here, in this one task (``celery.map``)."""
    fn = _task_of(self.app, task)
    return [fn(item) for item in it]


def _starmap(self: Task[Any, Any], task: Any, it: list[Any]) -> list[Any]:
    """Call ``task(*item)`` per item, here (``celery.starmap``)."""
    fn = _task_of(self.app, task)
    return [fn(*item) for item in it]


def _chunks(self: Task[Any, Any], task: Any, it: list[Any], n: int) -> str:
    """Send the parts of a ``chunks`` as a group; returns the group id (``celery.chunks``)."""
    result = chunks(task, it, n, app=self.app).apply_async()
    return str(result.id)


def _accumulate(*args: Any, **kwargs: Any) -> Any:
    """Return the arguments, or the one at ``index`` (``celery.accumulate``)."""
    index = kwargs.get("index")
    return args[index] if index is not None else list(args)


def _chord_unlock(self: Task[Any, Any], group_id: str, callback: Any,
                  interval: float | None = None, max_retries: int | None = None,
                  result: list[Any] | None = None, **_: Any) -> None:
    """Poll the header of a chord; send (or fail) the body once every part is ready."""
    app = self.app
    ids = flatten_ids(result or [])
    found = app.backend.get_task_metas(ids)  # one round trip where the backend can
    metas = [found[tid] for tid in ids]
    if any(meta.get("status") not in states.READY_STATES for meta in metas):
        delay = interval if interval is not None else app.conf.result_chord_retry_interval
        raise self.retry(countdown=delay, max_retries=max_retries)
    parts = [(tid, str(meta.get("status")), decode_result(meta))
             for tid, meta in zip(ids, metas, strict=True)]
    send_body_or_fail(app, callback, parts, parent=self.request, shape=result)


def register_builtins(app: Taskframe) -> None:
    """Register the ``celery.*`` canvas tasks on ``app`` (an existing task of the name wins)."""
    specs: list[tuple[str, Any, dict[str, Any]]] = [
        ("celery.map", _map, {"bind": True}),
        ("celery.starmap", _starmap, {"bind": True}),
        ("celery.chunks", _chunks, {"bind": True}),
        ("celery.accumulate", _accumulate, {}),
        ("celery.chord_unlock", _chord_unlock,
         {"bind": True, "max_retries": None, "ignore_result": True}),
    ]
    for name, fn, options in specs:
        if name not in app.tasks:
            app.register_task(Task(fn, app=app, name=name, typing=False, **options))
