"""Chords without polling: start the header, count its parts, send the body once.

Client side, ``start_chord`` gives every header task the body (``chord`` in the
message embed), a ``group_id`` and its ``group_index``, and records the header
in the result backend before sending anything:

* Redis backend: Celery's own chord keys (``celery-taskset-meta-<gid>.s`` holds
  the size; parts go to ``.j``, see ``taskframe.chord_redis``), so Celery and
  taskframe workers count the same chord together.
* Any other backend with a counter (database, GCS, memory): the header's task
  ids are saved as a group and each part ``incr``\\ s ``chord-unlock-<gid>``
  (``taskframe.chord_counter``; the counters are deleted once the body is sent).
* A backend without a counter: Celery's ``celery.chord_unlock`` task polls
  (the only polling path; ``taskframe.canvas_builtins``).

Worker side, ``on_chord_part_return`` runs after a header task stored its
outcome. The part that completes the count (and, on the counter path, sees every
header result ready and wins a second ``incr``) reads the results in header
order and sends the body, once. A failed header task fails the body with
``ChordError`` and calls the body's errbacks instead; so does one that ends
REVOKED (expired, revoked, terminated), which the worker counts with
``on_revoked``.
"""

from __future__ import annotations

import logging
import traceback as tb_module
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from taskframe import chord_counter, chord_redis
from taskframe.canvas import Signature, _new_id, as_list, maybe_signature
from taskframe.canvas_primitives import chain, chord, group
from taskframe.chord_counter import Part
from taskframe.context import Context
from taskframe.errors import ChordError, TaskRevokedError
from taskframe.protocol import states
from taskframe.protocol.results import group_tuple, result_tuple

if TYPE_CHECKING:
    from taskframe.app import Taskframe
    from taskframe.backends.base import Backend
    from taskframe.task import Task

__all__ = [
    "add_to_chord",
    "call_errbacks",
    "fail_chain",
    "finish_chord",
    "on_chord_part_return",
    "on_revoked",
    "replace_task",
    "start_chord",
]

logger = logging.getLogger("taskframe.chord")

def _has_counter(backend: Backend) -> bool:
    return backend.implements_incr


# -- client side ------------------------------------------------------------------------


def _reporters(header: group, args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[Signature]:
    """The header members that report to the chord, one part each.

    A group member is unrolled: its members are parts of the chord (Celery 5.7
    flattens it too, but reverses the inner group's order, an effect of
    ``deque.extendleft`` in ``group._freeze_unroll``; taskframe keeps the order
    written). A member whose result is a group (a chain ending in a group, a
    chord whose body is a group) is one part: the body gets that group's results
    as one list, as Celery's does.
    """
    return [_one_part(member) for member in header.unrolled(args, kwargs)]


def _one_part(sig: Signature) -> Signature:
    """``sig`` made to report once: a group it ends in is gathered into one list.

    The group becomes the header of an inner chord whose body is Celery's
    ``celery.accumulate`` (``index=0``: it returns the list it is given), and that
    body is the task that reports to the outer chord.
    """
    if isinstance(sig, chain):
        steps = sig.tasks
        if steps:
            steps[-1] = _gathered(steps[-1])
    elif isinstance(sig, chord) and sig.body is not None:
        sig["kwargs"]["body"] = _gathered(sig.body)
    return sig


def _gathered(sig: Signature) -> Signature:
    if isinstance(sig, group):
        gather = Signature("celery.accumulate", kwargs={"index": 0}, app=sig._app)
        return chord(sig, body=gather, app=sig._app)
    return _one_part(sig)


def start_chord(app: Taskframe, header: group, body: Signature, args: Sequence[Any],
                kwargs: Mapping[str, Any], options: dict[str, Any]) -> Any:
    """Send a chord's header; the body is sent by the header task that ends last.

    ``options`` may carry ``task_id`` (the body's), ``chain`` (steps after the
    body), ``link``/``link_error`` (the body's) and ``group_id``/``group_index``/
    ``chord`` (this chord is itself a part of an outer chord: its body reports).
    Returns the body's result handle (a ``GroupResult`` when the body is a group).
    """
    outer = {key: options.pop(key) for key in ("group_id", "group_index", "chord")
             if options.get(key) is not None}
    remaining = options.pop("chain", None)
    result = body.freeze(options.pop("task_id", None))
    for callback in as_list(options.pop("link", None) or ()):
        body.link(callback)
    for errback in as_list(options.pop("link_error", None) or ()):
        body.link_error(errback)
    if remaining:
        body = chain(body, *[maybe_signature(s, app=app) for s in reversed(remaining)], app=app)
    if outer:
        body.set(**outer)
    members = _reporters(header, args, kwargs)
    if not members:
        body.apply_async(([],), **options)
        return result
    group_id = str(header.id or _new_id())
    frozen = [member.freeze() for member in members]
    ids = [str(r.id) for r in frozen]
    if hasattr(result, "parent"):
        from taskframe.result_group import GroupResult

        result.parent = GroupResult(group_id, frozen, app=app)
    body_dict = dict(body)
    body_dict["chord_size"] = len(members)
    _record_header(app, group_id, ids, body_dict)
    for index, member in enumerate(members):
        member.apply_async(group_id=group_id, group_index=index, chord=body_dict, **options)
    return result


def _record_header(app: Taskframe, group_id: str, ids: list[str],
                   body: dict[str, Any]) -> None:
    backend = app.backend
    if chord_redis.handles(backend):
        chord_redis.set_chord_size(backend, group_id, len(ids))
    elif _has_counter(backend):
        backend.save_group(group_id, group_tuple(group_id, [result_tuple(i) for i in ids]))
    else:
        app.send_task(
            "celery.chord_unlock", (group_id, body),
            {"result": [result_tuple(i) for i in ids],
             "interval": app.conf.result_chord_retry_interval},
            countdown=app.conf.result_chord_retry_interval,
            queue=body["options"].get("queue"), priority=body["options"].get("priority"),
        )


# -- worker side ------------------------------------------------------------------------


def on_chord_part_return(task: Task[Any, Any], ctx: Context, state: str, value: Any) -> None:
    """Count one ended header task; the last one sends the body (or fails it)."""
    if not ctx.group or not ctx.chord:
        return
    app = task.app
    backend = app.backend
    try:
        if chord_redis.handles(backend):
            claim = chord_redis.part_return(backend, ctx, state, value)
            if claim is None:
                return
            try:
                finish_chord(app, ctx, claim.parts, shape=claim.shape)
            finally:
                chord_redis.release(backend, ctx.group, claim)
            return
        if not _has_counter(backend):
            return  # celery.chord_unlock polls for this chord
        fired = chord_counter.part_return(backend, ctx)
        if fired is not None:
            try:
                finish_chord(app, ctx, *fired)
            finally:
                chord_counter.forget(backend, str(ctx.group))
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


def fail_signature(app: Taskframe, sig: Signature, exc: BaseException) -> None:
    """Store ``exc`` as the outcome of every task ``sig`` would have run; call errbacks."""
    einfo = "".join(tb_module.format_exception(exc))
    if isinstance(sig, chain):
        steps = sig.tasks
        for step in steps:
            fail_signature(app, step, exc)
        return
    if isinstance(sig, group):
        for member in sig.tasks:
            fail_signature(app, member, exc)
        return
    if isinstance(sig, chord):
        body = sig.body
        if body is not None:
            fail_signature(app, body, exc)
        return
    task_id = sig.id or _new_id()
    try:
        app.backend.mark_as_failure(task_id, exc, traceback=einfo)
    except Exception:
        logger.exception("could not store the failure of %s", task_id)
    request = Context(id=task_id, task=sig.name, args=sig.args, kwargs=dict(sig.kwargs),
                      root_id=sig.options.get("root_id"), group=sig.options.get("group_id"),
                      called_directly=False)
    call_errbacks(app, as_list(sig.options.get("link_error") or ()), request, exc, einfo)
    fail_chain(app, sig.options.get("chain"), exc, einfo)


def fail_chain(app: Taskframe, embedded: Iterable[Mapping[str, Any]] | None,
               exc: BaseException, einfo: str) -> None:
    """Mark the steps a failed task will never send as failed (Celery's ``_fail_chain``)."""
    for step in embedded or ():
        task_id = (step.get("options") or {}).get("task_id")
        if not task_id:
            continue
        try:
            app.backend.mark_as_failure(str(task_id), exc, traceback=einfo)
        except Exception:
            logger.exception("could not store the failure of chain step %s", task_id)


def call_errbacks(app: Taskframe, errbacks: Iterable[Mapping[str, Any]] | None, request: Context,
                  exc: BaseException, einfo: str) -> None:
    """Call each errback: in-process with ``(request, exc, traceback)`` when its function
    takes more than one positional argument (Celery's rule), else send it with the
    failed task's id."""
    from taskframe.worker.trace import _takes_request

    for data in errbacks or ():
        sig = Signature.from_dict(data, app=app)
        local = app.tasks.get(sig.name)
        try:
            if sig.subtask_type is None and local is not None and _takes_request(local):
                local.run(request, exc, einfo, *sig.args, **sig.kwargs)
            else:
                sig.apply_async((request.id,), parent_id=request.id,
                                root_id=request.root_id or request.id)
        except Exception:
            logger.exception("errback %r of %s[%s] raised", sig, request.task, request.id)


# -- Task.replace and Task.add_to_chord -------------------------------------------------


def replace_task(task: Task[Any, Any], sig: Mapping[str, Any]) -> Any:
    """Send ``sig`` in place of the running task: same id, callbacks, chain and chord.

    Returns the value of ``sig`` run eagerly when the task runs eagerly; otherwise
    the caller raises ``Ignore`` so the worker stores nothing for the replaced run.
    """
    request = task.request
    new = maybe_signature(sig, app=task.app).clone()
    if isinstance(new, group):
        new = chord(new, body=Signature("celery.accumulate", kwargs={"index": 0},
                                         app=task.app), app=task.app)
    if request.is_eager:
        return new.apply().get()
    new.freeze(request.id)
    # Celery's ``replaced_task_nesting`` header: one more than the replaced task's, on
    # the replacement, on each of its steps and on the chain steps it takes over.
    nesting = int(request.headers.get("replaced_task_nesting") or 0) + 1
    options: dict[str, Any] = {"root_id": request.root_id, "parent_id": request.parent_id,
                               "replaced_task_nesting": nesting}
    if isinstance(new, chain):
        for step in new.tasks:
            step.set(replaced_task_nesting=nesting)
    if request.chain:
        options["chain"] = [{**step, "options": {**(step.get("options") or {}),
                                                 "replaced_task_nesting": nesting}}
                            for step in request.chain]
    if request.group and request.chord:
        options.update(group_id=request.group, group_index=request.group_index,
                       chord=request.chord)
    if request.callbacks:
        options["link"] = request.callbacks
    if request.errbacks:
        options["link_error"] = request.errbacks
    new.apply_async(**{k: v for k, v in options.items() if v is not None})
    return None


def add_to_chord(task: Task[Any, Any], sig: Mapping[str, Any], lazy: bool = False) -> Any:
    """Add ``sig`` to the header of the chord the running task belongs to.

    The body then waits for it too and gets its value last. Returns the new
    task's result (or the frozen signature with ``lazy=True``).
    """
    request = task.request
    if not request.group or not request.chord:
        raise ValueError("add_to_chord() called by a task that is not part of a chord")
    app = task.app
    new = maybe_signature(sig, app=app).clone()
    new.set(group_id=request.group, chord=request.chord)
    result = new.freeze(root_id=request.root_id)
    backend = app.backend
    if chord_redis.handles(backend):
        chord_redis.add_to_chord(backend, request.group)
    else:
        saved = backend.restore_group(request.group)
        if saved is None:
            raise ValueError(f"chord {request.group}: no header state to add to")
        saved[1].append(result_tuple(str(result.id)))
        backend.save_group(request.group, saved)
    if lazy:
        return new
    return new.apply_async()
