"""``Signature``: a task call as data, and the helpers every canvas primitive shares.

A ``Signature`` is a ``dict`` with Celery's keys (``task``, ``args``, ``kwargs``,
``options``, ``subtask_type``, ``immutable``, and ``chord_size`` when known), so
it travels inside task messages unchanged (``link``, ``link_error``, ``chain``,
``chord``) and a canvas built by Celery is read here, and the reverse.

Composite signatures keep Celery's layouts: a chain or a group holds its parts
in ``kwargs["tasks"]``; a chord holds ``kwargs["header"]`` and ``kwargs["body"]``.
The ``args`` of a composite are partial arguments for its entry points (the first
task of a chain, every member of a group or of a chord header).

How they run (nothing polls while a chord waits):

* chain: the first task is sent with the rest embedded (``chain``, reversed, the
  next step last); each worker sends the next step with its result prepended.
* group: every member is sent now with the same ``group_id``.
* chord: the header is a group whose members carry the body (``chord``); each
  member, as it ends, counts itself in the result backend (``canvas.chords``)
  and the last one sends the body with the header's results in order.

The primitives live in ``canvas.primitives``; each registers itself in
``Signature.TYPES`` under its ``subtask_type``, which is how a signature dict
becomes its primitive and how ``a | b`` builds a chain without importing it.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from taskframe.current import current_app
from taskframe.result.async_result import AsyncResult

if TYPE_CHECKING:
    from taskframe.client.app import Taskframe
    from taskframe.client.task import Task

__all__ = ["Signature", "maybe_signature", "signature"]

#: Options that say where a step sits in a workflow; a composite consumes them.
CONTROL_OPTIONS = frozenset({
    "task_id", "group_id", "group_index", "chord", "chain", "link", "link_error",
    "parent_id", "root_id",
})
#: Celery options with no meaning here (stamping); dropped before sending.
_IGNORED_OPTIONS = ("stamped_headers", "stamps", "subtask_type", "chord_size")


def _new_id() -> str:
    return str(uuid.uuid4())


class Signature(dict[str, Any]):
    """A task invocation to be made later: ``add.s(2)``, ``add.si(2, 3)``.

    Args:
        task: a task name, a ``Task``, or a signature dict (Celery's shape).
        args: partial positional arguments (a parent's result is prepended).
        kwargs: partial keyword arguments.
        options: ``apply_async`` options (``queue``, ``countdown``, ``link``, ...).
        subtask_type: ``None`` for a task; ``"chain"``, ``"group"``, ``"chord"``, ...
        immutable: ``si()``: never take a parent's result.
        app: the app to send with (the current app when ``None``).
    """

    #: ``subtask_type`` -> class, filled by the primitives' module.
    TYPES: ClassVar[dict[str, type[Signature]]] = {}
    _app: Taskframe | None

    def __init__(
        self,
        task: str | Mapping[str, Any] | Task[Any, Any],
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
        *,
        subtask_type: str | None = None,
        immutable: bool = False,
        app: Taskframe | None = None,
        **extra_options: Any,
    ) -> None:
        if isinstance(task, Mapping):
            source = task
            if app is None and isinstance(task, Signature):
                app = task._app
            super().__init__(
                task=source["task"],
                args=list(source.get("args") or ()),
                kwargs=dict(source.get("kwargs") or {}),
                options=dict(source.get("options") or {}),
                subtask_type=source.get("subtask_type"),
                immutable=bool(source.get("immutable", False)),
            )
            if source.get("chord_size") is not None:
                self["chord_size"] = int(source["chord_size"])
        else:
            name = task if isinstance(task, str) else task.name
            if app is None and not isinstance(task, str):
                app = task._app
            super().__init__(
                task=name,
                args=list(args or ()),
                kwargs=dict(kwargs or {}),
                options=dict(options or {}),
                subtask_type=subtask_type,
                immutable=immutable,
            )
        self["options"].update(extra_options)
        self._app = app

    # -- building from dicts ------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], app: Taskframe | None = None) -> Signature:
        """The signature (of the right primitive class) a dict describes."""
        kind = data.get("subtask_type")
        target = cls.TYPES.get(kind, Signature) if kind else Signature
        if target is Signature:
            return Signature(data, app=app)
        return target.from_dict(data, app=app)

    # -- fields -------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The task name."""
        return str(self["task"])

    task = name

    @property
    def args(self) -> list[Any]:
        """The partial positional arguments."""
        return list(self["args"])

    @property
    def kwargs(self) -> dict[str, Any]:
        """The partial keyword arguments (the live dict: composites keep their parts here)."""
        value: dict[str, Any] = self["kwargs"]
        return value

    @property
    def options(self) -> dict[str, Any]:
        """The ``apply_async`` options (the live dict)."""
        value: dict[str, Any] = self["options"]
        return value

    @property
    def immutable(self) -> bool:
        """True for ``si()``: a parent's result is not prepended."""
        return bool(self["immutable"])

    @property
    def subtask_type(self) -> str | None:
        """``None`` for a plain task, else the primitive's type name."""
        value = self.get("subtask_type")
        return None if value is None else str(value)

    @property
    def id(self) -> str | None:
        """The task id, once frozen (``options["task_id"]``)."""
        value = self["options"].get("task_id")
        return None if value is None else str(value)

    @property
    def app(self) -> Taskframe:
        """The app this signature sends with."""
        return self._resolve_app()

    @property
    def type(self) -> Task[Any, Any]:
        """The registered task this signature calls."""
        return self._resolve_app().get_task(self.name)

    # -- changing -----------------------------------------------------------------------

    def set(self, immutable: bool | None = None, **options: Any) -> Signature:
        """Add ``apply_async`` options in place; returns self for chaining."""
        if immutable is not None:
            self["immutable"] = bool(immutable)
        self["options"].update(options)
        return self

    def set_immutable(self, immutable: bool) -> None:
        """Make the signature (im)mutable in place."""
        self["immutable"] = bool(immutable)

    def clone(self, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None,
              **options: Any) -> Signature:
        """A deep copy with ``args`` prepended (ignored when immutable), kwargs and options merged.

        Celery's rule: the new positional arguments come first, as a parent's
        result does.
        """
        sig = type(self).from_dict(copy.deepcopy(dict(self)), app=self._app)
        if not sig.immutable:
            sig["args"] = list(args or ()) + list(sig["args"])
            sig["kwargs"] = {**sig["kwargs"], **(kwargs or {})}
        sig["options"].update(options)
        return sig

    def replace(self, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None,
                options: Mapping[str, Any] | None = None) -> Signature:
        """A copy with ``args``, ``kwargs`` or ``options`` replaced (not merged)."""
        sig = self.clone()
        if args is not None:
            sig["args"] = list(args)
        if kwargs is not None:
            sig["kwargs"] = dict(kwargs)
        if options is not None:
            sig["options"] = dict(options)
        return sig

    def link(self, callback: Mapping[str, Any]) -> Mapping[str, Any]:
        """Send ``callback`` with this task's result when it succeeds; returns ``callback``."""
        self._append_option("link", callback)
        return callback

    def link_error(self, errback: Mapping[str, Any]) -> Mapping[str, Any]:
        """Call ``errback`` when this task fails; returns ``errback``."""
        self._append_option("link_error", errback)
        return errback

    def on_error(self, errback: Mapping[str, Any]) -> Signature:
        """``link_error(errback)`` returning self, for ``sig.on_error(eb).delay()``."""
        self.link_error(errback)
        return self

    def _append_option(self, key: str, sig: Mapping[str, Any]) -> None:
        current = self["options"].get(key)
        items = [] if current is None else (
            list(current) if isinstance(current, list | tuple) else [current])
        if not any(dict(existing) == dict(sig) for existing in items):
            items.append(sig)
        self["options"][key] = items

    def freeze(self, _id: str | None = None, **options: Any) -> Any:
        """Give the task its id now (``_id``, else the one set, else a new one); its result."""
        if _id is not None:
            self["options"]["task_id"] = _id
        self["options"].setdefault("task_id", _new_id())
        for key, value in options.items():
            if value is not None:
                self["options"][key] = value
        return AsyncResult(str(self["options"]["task_id"]), app=self._resolve_app(),
                           task_name=self.name)

    # -- composing ----------------------------------------------------------------------

    def __or__(self, other: Any) -> Signature:  # type: ignore[override]
        """``a | b``: a chain (``group | sig`` makes a chord, as in Celery)."""
        if not isinstance(other, Mapping):
            return NotImplemented
        return self.TYPES["chain"](self, maybe_signature(other, app=self._app), app=self._app)

    # -- sending ------------------------------------------------------------------------

    def apply_async(self, args: Sequence[Any] | None = None,
                    kwargs: Mapping[str, Any] | None = None, **options: Any) -> Any:
        """Send the task; ``args`` are prepended to the partial ones unless immutable.

        Returns:
            the ``AsyncResult`` (a ``GroupResult`` for a group).
        """
        app = self._resolve_app()
        call_args, call_kwargs = self._merged_arguments(args, kwargs)
        merged = _sendable({**self.options, **options})
        task = app.tasks.get(self.name)
        if task is not None:
            return task.apply_async(call_args, call_kwargs, **merged)
        return app.send_task(self.name, call_args, call_kwargs, **merged)

    def _merged_arguments(self, args: Sequence[Any] | None,
                          kwargs: Mapping[str, Any] | None) -> tuple[list[Any], dict[str, Any]]:
        if self.immutable:
            return self.args, dict(self.kwargs)
        return list(args or ()) + self.args, {**self.kwargs, **(kwargs or {})}

    def delay(self, *args: Any, **kwargs: Any) -> Any:
        """``apply_async(args, kwargs)``."""
        return self.apply_async(args, kwargs)

    def apply(self, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None,
              **options: Any) -> Any:
        """Run the task here and now (``EagerResult``)."""
        call_args, call_kwargs = self._merged_arguments(args, kwargs)
        merged = _sendable({k: v for k, v in {**self.options, **options}.items()
                            if k not in CONTROL_OPTIONS or k == "task_id"})
        return self.type.apply(call_args, call_kwargs, **merged)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the task function here with the partial arguments (no message)."""
        call_args, call_kwargs = self._merged_arguments(args, kwargs)
        return self.type(*call_args, **call_kwargs)

    def _resolve_app(self) -> Taskframe:
        if self._app is not None:
            return self._app
        return current_app()

    # -- representation -----------------------------------------------------------------

    def __deepcopy__(self, memo: dict[int, Any]) -> Signature:
        data = copy.deepcopy(dict(self), memo)
        return type(self).from_dict(data, app=self._app)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (dict(self),))

    def __json__(self) -> dict[str, Any]:
        return dict(self)

    def __repr__(self) -> str:
        args = ", ".join([repr(a) for a in self["args"]] +
                         [f"{k}={v!r}" for k, v in self["kwargs"].items()])
        return f"{self['task']}{'!' if self.immutable else ''}({args})"


def _rebuild(data: dict[str, Any]) -> Signature:
    return Signature.from_dict(data)


def _sendable(options: dict[str, Any]) -> dict[str, Any]:
    for key in _IGNORED_OPTIONS:
        options.pop(key, None)
    return options


def signature(task: str | Mapping[str, Any] | Task[Any, Any],
              args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None,
              **options: Any) -> Signature:
    """Build a signature from a task name, a task or a signature dict (Celery's ``signature``).

    A signature dict with a ``subtask_type`` becomes its primitive (``chain``,
    ``group``, ``chord``, ...); a ``Signature`` is returned as it is.
    """
    if isinstance(task, Signature):
        return task
    app = options.pop("app", None)
    if isinstance(task, Mapping):
        return Signature.from_dict(task, app=app)
    return Signature(task, args, kwargs, options, app=app)


def maybe_signature(data: Any, app: Taskframe | None = None, clone: bool = False) -> Any:
    """``data`` as a signature when it is a mapping; ``None`` and others pass through."""
    if data is None or not isinstance(data, Mapping):
        return data
    if isinstance(data, Signature):
        if app is not None and data._app is None:
            data._app = app
        return data.clone() if clone else data
    return Signature.from_dict(data, app=app)


def as_list(tasks: Iterable[Any] | Any) -> list[Any]:
    """The parts given to ``chain(...)``/``group(...)`` either spread or as one iterable."""
    if isinstance(tasks, Mapping):
        return [tasks]
    return list(tasks)
