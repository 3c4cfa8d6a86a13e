"""The chord primitive, and how a chord is sent: the header gets the body, the backend a count.

``start_chord`` gives every header task the body (``chord`` in the message embed), a
``group_id`` and its ``group_index``, and records the header in the backend's chord store
(``Backend.chord_store()``, ``taskframe.backends.chord``) before sending anything:

* Redis backend: Celery's own chord keys (``celery-taskset-meta-<gid>.s`` holds the size;
  parts go to ``.j``, see ``backends.redis_chord``), so Celery and taskframe workers
  count the same chord together.
* Any other backend with a counter (database, GCS, memory): the header's task ids are
  saved as a group and each part ``incr``\\ s ``chord-unlock-<gid>``
  (``backends.chord_counter``; the counters are deleted once the body is sent).
* A backend without a counter (no chord store): Celery's ``celery.chord_unlock`` task
  polls (the only polling path; ``client.builtins``).

How the count ends, on the worker, is ``canvas.chord_completion``. ``Task.replace`` and
``Task.add_to_chord`` are here too (``replace_task``, ``add_to_chord``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from taskframe.canvas.primitives import _Composite, chain, group
from taskframe.canvas.signatures import Signature, _new_id, _sendable, as_list, maybe_signature
from taskframe.protocol.results import result_tuple
from taskframe.result.group import GroupResult

if TYPE_CHECKING:
    from taskframe.client.app import Taskframe
    from taskframe.client.task import Task

__all__ = ["add_to_chord", "chord", "replace_task", "start_chord"]


class chord(_Composite):  # Celery's lower-case name
    """A group (the header) and a body sent with the header's results, in order.

    ``chord(header)(body)``, ``chord(header, body).apply_async()`` or
    ``group(...) | body``. The body is sent once, by the header task that ends
    last, counted atomically in the result backend (``taskframe.chord``).
    """

    def __init__(self, header: Any, body: Any = None, app: Taskframe | None = None,
                 **options: Any) -> None:
        head = header if isinstance(header, group) else group(
            *[maybe_signature(t, app=app) for t in as_list(header)], app=app)
        if app is None:
            app = head._app or (body._app if isinstance(body, Signature) else None)
        kwargs = {"header": head, "body": maybe_signature(body, app=app), "kwargs": {}}
        super().__init__("celery.chord", (), kwargs, options, subtask_type="chord", app=app)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], app: Taskframe | None = None) -> Signature:
        """Rebuild a chord from Celery's dict (``kwargs.header``/``kwargs.body``)."""
        kwargs = dict(data.get("kwargs") or {})
        header = kwargs.get("header") or []
        if isinstance(header, Mapping):
            head = maybe_signature(header, app=app)
        else:
            head = group(*[maybe_signature(t, app=app) for t in header], app=app)
        sig = cls(head, maybe_signature(kwargs.get("body"), app=app), app=app)
        sig["args"] = list(data.get("args") or ())
        sig["options"].update(data.get("options") or {})
        return sig

    @property
    def tasks(self) -> list[Signature]:
        """The header's members."""
        header: group = self.header
        return header.tasks

    @property
    def header(self) -> group:
        """The header group."""
        value = maybe_signature(self["kwargs"]["header"], app=self._app)
        if not isinstance(value, group):
            value = group(value, app=self._app)
        self["kwargs"]["header"] = value
        return value

    @property
    def body(self) -> Signature | None:
        """The body signature (``None`` until given)."""
        value = maybe_signature(self["kwargs"].get("body"), app=self._app)
        self["kwargs"]["body"] = value
        return value  # type: ignore[no-any-return]

    def __call__(self, body: Any = None, **options: Any) -> Any:
        """``chord(header)(body)``: apply with ``body``."""
        return self.apply_async((), body=body, **options)

    def __or__(self, other: Any) -> Signature:  # type: ignore[override]
        """``chord | sig`` chains ``sig`` after the body."""
        if not isinstance(other, Mapping):
            return NotImplemented
        body = self.body
        if body is None:
            raise ValueError("chord has no body")
        sig = self.clone()
        sig["kwargs"]["body"] = chain(body, maybe_signature(other, app=self._app), app=self._app)
        return sig

    def link(self, callback: Mapping[str, Any]) -> Mapping[str, Any]:
        """Link ``callback`` to the body."""
        body = self.body
        assert body is not None, "chord has no body"
        return body.link(callback)

    def link_error(self, errback: Mapping[str, Any]) -> Mapping[str, Any]:
        """Link ``errback`` to the body (called with ``ChordError`` when a header task fails)."""
        body = self.body
        assert body is not None, "chord has no body"
        return body.link_error(errback)

    def freeze(self, _id: str | None = None, **options: Any) -> Any:
        """Give the body its id; returns the body's result."""
        body = self.body
        if body is None:
            raise ValueError("chord has no body")
        return body.freeze(_id, **options)

    def apply_async(self, args: Sequence[Any] | None = None,
                    kwargs: Mapping[str, Any] | None = None, body: Any = None,
                    **options: Any) -> Any:
        """Send the header; returns the body's result (it arrives once the header is done)."""
        app = self._resolve_app()
        body_sig = maybe_signature(body, app=app) if body is not None else self.body
        if body_sig is None:
            raise ValueError("chord has no body: chord(header)(body)")
        if app.conf.task_always_eager:
            return self._apply_eager(body_sig, args, kwargs)
        opts = _sendable({**self.options, **options})
        call_args, call_kwargs = self._merged_arguments(args, kwargs)
        return start_chord(app, self.header, body_sig.clone(), call_args, call_kwargs, opts)

    def apply(self, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None,
              body: Any = None, **options: Any) -> Any:
        """Run the header here, then the body with its results."""
        body_sig = maybe_signature(body, app=self._app) if body is not None else self.body
        if body_sig is None:
            raise ValueError("chord has no body")
        return self._apply_eager(body_sig, args, kwargs)

    def _apply_eager(self, body: Signature, args: Sequence[Any] | None,
                     kwargs: Mapping[str, Any] | None) -> Any:
        call_args, call_kwargs = self._merged_arguments(args, kwargs)
        values = [member.apply().get() for member in self.header.unrolled(call_args,
                                                                           call_kwargs)]
        return body.apply((values,))

    def __repr__(self) -> str:
        return f"chord({self.header!r}, {self.body!r})"



Signature.TYPES["chord"] = chord


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
        result.parent = GroupResult(group_id, frozen, app=app)
    body_dict = dict(body)
    body_dict["chord_size"] = len(members)
    _record_header(app, group_id, ids, body_dict)
    for index, member in enumerate(members):
        member.apply_async(group_id=group_id, group_index=index, chord=body_dict, **options)
    return result


def _record_header(app: Taskframe, group_id: str, ids: list[str],
                   body: dict[str, Any]) -> None:
    store = app.backend.chord_store()
    if store is not None:
        store.record_header(group_id, ids)
    else:
        app.send_task(
            "celery.chord_unlock", (group_id, body),
            {"result": [result_tuple(i) for i in ids],
             "interval": app.conf.result_chord_retry_interval},
            countdown=app.conf.result_chord_retry_interval,
            queue=body["options"].get("queue"), priority=body["options"].get("priority"),
        )


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
    store = app.backend.chord_store()
    if store is None:  # celery.chord_unlock polls the header it was sent with
        raise ValueError(f"chord {request.group}: no header state to add to "
                         f"(result backend {app.backend!r} has no chord counter)")
    store.add_part(request.group, str(result.id))
    if lazy:
        return new
    return new.apply_async()
