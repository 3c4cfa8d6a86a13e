"""The canvas primitives: ``chain``, ``group``, ``chunks``, ``xmap``, ``xstarmap``.

``chord`` is a primitive too; it lives in ``canvas.chords`` with the code that sends it, and
the primitives here reach it as ``Signature.TYPES["chord"]``.

Import them from ``taskframe.canvas`` (or ``taskframe``). Each is a ``Signature``
with Celery's dict layout, so it can be embedded in a message and rebuilt by
``Signature.from_dict`` on the other side, by taskframe or by Celery.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from taskframe.canvas.signatures import (
    Signature,
    _new_id,
    _sendable,
    as_list,
    maybe_signature,
)
from taskframe.result.group import GroupResult

if TYPE_CHECKING:
    from taskframe.client.app import Taskframe
    from taskframe.client.task import Task

__all__ = ["chain", "chunks", "group", "xmap", "xstarmap"]


def _group_result(group_id: str, results: list[Any], app: Taskframe) -> Any:
    return GroupResult(group_id, results, app=app)


def _as_chain(sig: Signature) -> chain:
    assert isinstance(sig, chain)
    return sig


def _as_group(sig: Signature) -> group:
    assert isinstance(sig, group)
    return sig


def _control(options: dict[str, Any], *keys: str) -> dict[str, Any]:
    """Pop ``keys`` out of ``options`` (those that are set)."""
    return {key: options.pop(key) for key in keys if options.get(key) is not None}


class _Composite(Signature):
    """A primitive whose ``kwargs`` hold its structure: partial kwargs are not kept."""

    def _merged_arguments(self, args: Sequence[Any] | None,
                          kwargs: Mapping[str, Any] | None) -> tuple[list[Any], dict[str, Any]]:
        if self.immutable:
            return self.args, {}
        return list(args or ()) + self.args, dict(kwargs or {})

    def clone(self, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None,
              **options: Any) -> Signature:
        """A deep copy with ``args`` prepended (they go to the entry points when applied)."""
        return super().clone(args, None, **options)


class _TaskList(_Composite):
    """A chain or a group: Celery's ``{"task": "celery.<kind>", "kwargs": {"tasks": [...]}}``.

    Built from signatures given one by one or as one iterable.
    """

    kind: ClassVar[str] = ""

    def __init__(self, *tasks: Any, app: Taskframe | None = None, **options: Any) -> None:
        items = as_list(tasks[0]) if len(tasks) == 1 and not isinstance(tasks[0], Mapping) \
            else list(tasks)
        sigs = [maybe_signature(t, app=app) for t in items]
        if app is None:
            app = next((s._app for s in sigs if s._app is not None), None)
        super().__init__(f"celery.{self.kind}", (), {"tasks": sigs}, options,
                         subtask_type=self.kind, app=app)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], app: Taskframe | None = None) -> Signature:
        """Rebuild one from Celery's dict (``kwargs.tasks``)."""
        kwargs = data.get("kwargs") or {}
        sig = cls(*[maybe_signature(t, app=app) for t in kwargs.get("tasks") or ()], app=app)
        sig["args"] = list(data.get("args") or ())
        sig["options"].update(data.get("options") or {})
        sig["immutable"] = bool(data.get("immutable", False))
        return sig

    @property
    def tasks(self) -> list[Signature]:
        """The steps (chain) or members (group), as signatures."""
        sigs = [maybe_signature(t, app=self._app) for t in self["kwargs"]["tasks"]]
        self["kwargs"]["tasks"] = sigs
        return sigs


class chain(_TaskList):  # Celery's lower-case name
    """Run tasks one after the other, each result prepended to the next one's arguments.

    ``chain(a.s(1), b.s(), c.s())`` or ``a.s(1) | b.s() | c.s()``. A group
    followed by another step becomes a chord (the step gets the list of results).
    """

    kind = "chain"

    def __or__(self, other: Any) -> Signature:  # type: ignore[override]
        if not isinstance(other, Mapping):
            return NotImplemented
        return chain(*self.tasks, maybe_signature(other, app=self._app), app=self._app,
                     **self.options)

    def link(self, callback: Mapping[str, Any]) -> Mapping[str, Any]:
        """Link ``callback`` to the last step."""
        return self.tasks[-1].link(callback)

    def link_error(self, errback: Mapping[str, Any]) -> Mapping[str, Any]:
        """Link ``errback`` to every step: whichever fails calls it."""
        for step in self.tasks:
            step.link_error(errback)
        return errback

    def _steps(self, remaining: Sequence[Any] | None = None) -> list[Signature]:
        """Flattened, cloned steps; a group followed by a step becomes a chord."""
        steps: list[Signature] = []
        for step in self.tasks:
            if isinstance(step, chain):
                inner = _as_chain(step.clone())._steps()
                if inner and step.args:  # a nested chain's partial args go to its first step
                    inner[0] = inner[0].clone(step.args)
                steps.extend(inner)
            elif not (isinstance(step, group) and not step.tasks):
                steps.append(step.clone())
        for embedded in reversed(list(remaining or ())):
            steps.append(maybe_signature(embedded, app=self._app))
        index = 0
        while index < len(steps) - 1:
            if isinstance(steps[index], group):
                body = steps.pop(index + 1)
                steps[index] = self.TYPES["chord"](steps[index], body=body, app=self._app)
            else:
                index += 1
        return steps

    def _prepare(self, options: dict[str, Any]) -> list[Signature]:
        steps = self._steps(options.pop("chain", None))
        if not steps:
            raise ValueError("cannot apply an empty chain")
        last = steps[-1]
        last.set(**_control(options, "group_id", "group_index", "chord"))
        for callback in as_list(options.pop("link", None) or ()):
            last.link(callback)
        for errback in as_list(options.pop("link_error", None) or ()):
            for step in steps:
                step.link_error(errback)
        last.freeze(options.pop("task_id", None))
        for step in steps[:-1]:
            step.freeze()
        return steps

    def freeze(self, _id: str | None = None, **options: Any) -> Any:
        """Freeze every step; returns the last step's result."""
        steps = self.tasks
        if not steps:
            raise ValueError("cannot freeze an empty chain")
        for step in steps[:-1]:
            step.freeze()
        return steps[-1].freeze(_id, **options)

    def apply_async(self, args: Sequence[Any] | None = None,
                    kwargs: Mapping[str, Any] | None = None, **options: Any) -> Any:
        """Send the first step with the others embedded; returns the last step's result."""
        app = self._resolve_app()
        if app.conf.task_always_eager:
            return self.apply(args, kwargs, **options)
        opts = _sendable({**self.options, **options})
        steps = self._prepare(opts)
        call_args, call_kwargs = self._merged_arguments(args, kwargs)
        first, rest = steps[0], steps[1:]
        result: Any = None
        for step in steps:  # Celery's result.parent links, from the last step back
            previous, result = result, step.freeze()
            if previous is not None and hasattr(result, "parent"):
                result.parent = previous
        embedded = [dict(step) for step in reversed(rest)] or None
        first.apply_async(call_args, call_kwargs, chain=embedded, **opts)
        return result

    def apply(self, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None,
              **options: Any) -> Any:
        """Run every step here, in order; returns the last step's eager result."""
        call_args, call_kwargs = self._merged_arguments(args, kwargs)
        result: Any = None
        for index, step in enumerate(self._steps()):
            if index == 0:
                result = step.apply(call_args, call_kwargs)
            else:
                result = step.apply((result.get(),))
        return result

    def __repr__(self) -> str:
        return " | ".join(repr(t) for t in self.tasks) or "chain()"


class group(_TaskList):  # Celery's lower-case name
    """Run tasks in parallel; ``apply_async()`` returns a ``GroupResult``."""

    kind = "group"

    def __or__(self, other: Any) -> Signature:  # type: ignore[override]
        """``group | sig`` is a chord with ``sig`` as its body."""
        if not isinstance(other, Mapping):
            return NotImplemented
        return self.TYPES["chord"](self, body=maybe_signature(other, app=self._app), app=self._app)

    def __len__(self) -> int:
        return len(self["kwargs"]["tasks"])

    def __bool__(self) -> bool:
        return True

    def link(self, callback: Mapping[str, Any]) -> Mapping[str, Any]:
        """Link ``callback`` to every member."""
        for member in self.tasks:
            member.link(callback)
        return callback

    def link_error(self, errback: Mapping[str, Any]) -> Mapping[str, Any]:
        """Link ``errback`` to every member."""
        for member in self.tasks:
            member.link_error(errback)
        return errback

    def unrolled(self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None
                 ) -> list[Signature]:
        """The members cloned with ``args``/``kwargs``, nested groups flattened in order.

        A group inside a group runs its members as members of the outer one (Celery
        unrolls them too; see ``taskframe.chord`` for the order).
        """
        members: list[Signature] = []
        for member in self.tasks:
            if isinstance(member, group):
                inner = _as_group(member.clone(args))
                members.extend(inner.unrolled(inner.args, {} if inner.immutable else kwargs))
            else:
                members.append(member.clone(args, kwargs))
        return members

    def freeze(self, _id: str | None = None, **options: Any) -> Any:
        """Give the group and its members their ids; returns the ``GroupResult``."""
        if _id is not None:
            self["options"]["task_id"] = _id
        group_id = str(self["options"].setdefault("task_id", _new_id()))
        results = [member.freeze() for member in self.tasks]
        return _group_result(group_id, results, self._resolve_app())

    def apply_async(self, args: Sequence[Any] | None = None,
                    kwargs: Mapping[str, Any] | None = None, **options: Any) -> Any:
        """Send every member now; returns the ``GroupResult``.

        Sent with an embedded ``chain`` (a step followed it), the group becomes
        the header of a chord whose body is the rest of the chain.
        """
        app = self._resolve_app()
        if app.conf.task_always_eager:
            return self.apply(args, kwargs, **options)
        opts = _sendable({**self.options, **options})
        remaining = opts.pop("chain", None)
        if remaining:
            rest = chain(*[maybe_signature(s, app=app) for s in reversed(remaining)], app=app)
            return self.TYPES["chord"](self, body=rest, app=app).apply_async(args, kwargs, **opts)
        group_id = str(opts.pop("task_id", None) or self.id or _new_id())
        outer = _control(opts, "group_id", "group_index", "chord")
        call_args, call_kwargs = self._merged_arguments(args, kwargs)
        results = []
        for index, member in enumerate(self.tasks):
            step = member.clone()
            place: dict[str, Any] = {"group_id": group_id, "group_index": index}
            if "chord" in outer:
                # A group Celery built inside a chord (a chain's last step, a nested
                # chord's body): Celery froze its members into the chord, and they
                # report to it (taskframe gathers such a group itself: taskframe.chord).
                own = step.options
                place = {"group_id": own.get("group_id") or outer.get("group_id") or group_id,
                         "group_index": own.get("group_index", index),
                         "chord": own.get("chord") or outer["chord"]}
            results.append(step.apply_async(call_args, call_kwargs, **{**opts, **place}))
        return _group_result(group_id, results, app)

    def apply(self, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None,
              **options: Any) -> Any:
        """Run every member here; returns a ``GroupResult`` of eager results."""
        call_args, call_kwargs = self._merged_arguments(args, kwargs)
        group_id = str(options.get("task_id") or self.id or _new_id())
        results = [member.apply(call_args, call_kwargs) for member in self.tasks]
        return _group_result(group_id, results, self._resolve_app())

    def __repr__(self) -> str:
        return f"group([{', '.join(repr(t) for t in self.tasks)}])"


class xmap(Signature):  # Celery's lower-case name
    """One task message that calls ``task`` once per item (``celery.map``)."""

    def __init__(self, task: Mapping[str, Any] | Task[Any, Any], it: Iterable[Any],
                 app: Taskframe | None = None, **options: Any) -> None:
        sig = task.s() if not isinstance(task, Mapping) else maybe_signature(task, app=app)
        super().__init__(self._builtin, (), {"task": sig, "it": list(it)}, options,
                         subtask_type=self._kind, immutable=True, app=app or sig._app)

    _builtin = "celery.map"
    _kind = "xmap"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], app: Taskframe | None = None) -> Signature:
        """Rebuild from Celery's dict (``kwargs.task``/``kwargs.it``)."""
        kwargs = data.get("kwargs") or {}
        sig = cls(maybe_signature(kwargs["task"], app=app), kwargs.get("it") or (), app=app)
        sig["options"].update(data.get("options") or {})
        return sig


class xstarmap(xmap):  # Celery's lower-case name
    """One task message that calls ``task(*item)`` per item (``celery.starmap``)."""

    _builtin = "celery.starmap"
    _kind = "xstarmap"


class chunks(Signature):  # Celery's lower-case name
    """Split ``it`` into parts of ``n`` items, one ``starmap`` message per part."""

    def __init__(self, task: Mapping[str, Any] | Task[Any, Any], it: Iterable[Any], n: int,
                 app: Taskframe | None = None, **options: Any) -> None:
        sig = task.s() if not isinstance(task, Mapping) else maybe_signature(task, app=app)
        super().__init__("celery.chunks", (), {"task": sig, "it": list(it), "n": int(n)},
                         options, subtask_type="chunks", immutable=True, app=app or sig._app)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], app: Taskframe | None = None) -> Signature:
        """Rebuild from Celery's dict (``kwargs.task``/``it``/``n``)."""
        kwargs = data.get("kwargs") or {}
        sig = cls(maybe_signature(kwargs["task"], app=app), kwargs.get("it") or (),
                  int(kwargs["n"]), app=app)
        sig["options"].update(data.get("options") or {})
        return sig

    def group(self) -> group:
        """The group of ``starmap`` signatures, one per part."""
        kwargs = self["kwargs"]
        items = [list(item) for item in kwargs["it"]]
        size = kwargs["n"]
        task = maybe_signature(kwargs["task"], app=self._app)
        parts = [items[i:i + size] for i in range(0, len(items), size)]
        return group(*[xstarmap(task, part, app=self._app) for part in parts], app=self._app)

    def apply_async(self, args: Sequence[Any] | None = None,
                    kwargs: Mapping[str, Any] | None = None, **options: Any) -> Any:
        """Send the parts as a group; returns its ``GroupResult`` (one list per part)."""
        return self.group().apply_async(args, kwargs, **{**self.options, **options})

    def apply(self, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None,
              **options: Any) -> Any:
        """Run the parts here."""
        return self.group().apply(args, kwargs, **options)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """``chunks(...)()`` sends it, as in Celery."""
        return self.apply_async(args, kwargs)


for _cls in (chain, group, xmap, xstarmap, chunks):
    Signature.TYPES[str(getattr(_cls, "_kind", _cls.__name__))] = _cls
