"""Signatures: a task name with partial arguments and options, as Celery's.

A ``Signature`` is a ``dict`` with Celery's keys (``task``, ``args``, ``kwargs``,
``options``, ``subtask_type``, ``immutable``), so it travels inside task
messages unchanged (``link``, ``link_error``, ``chain``). Chains, groups and
chords build on it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from taskframe.app import Taskframe
    from taskframe.result import AsyncResult

__all__ = ["Signature", "signature"]


class Signature(dict[str, Any]):
    """A task invocation to be made later: ``add.s(2)``, ``add.si(2, 3)``."""

    def __init__(
        self,
        task: str | Mapping[str, Any],
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
        *,
        subtask_type: str | None = None,
        immutable: bool = False,
        app: Taskframe | None = None,
    ) -> None:
        if isinstance(task, Mapping):
            super().__init__(
                task=task["task"],
                args=list(task.get("args") or ()),
                kwargs=dict(task.get("kwargs") or {}),
                options=dict(task.get("options") or {}),
                subtask_type=task.get("subtask_type"),
                immutable=bool(task.get("immutable", False)),
            )
        else:
            super().__init__(
                task=task,
                args=list(args or ()),
                kwargs=dict(kwargs or {}),
                options=dict(options or {}),
                subtask_type=subtask_type,
                immutable=immutable,
            )
        self._app = app

    @property
    def name(self) -> str:
        """The task name."""
        return str(self["task"])

    @property
    def args(self) -> list[Any]:
        """The partial positional arguments."""
        return list(self["args"])

    @property
    def kwargs(self) -> dict[str, Any]:
        """The partial keyword arguments."""
        return dict(self["kwargs"])

    @property
    def options(self) -> dict[str, Any]:
        """The ``apply_async`` options."""
        return dict(self["options"])

    @property
    def immutable(self) -> bool:
        """True for ``si()``: a parent's result is not prepended."""
        return bool(self["immutable"])

    def set(self, **options: Any) -> Signature:
        """Add ``apply_async`` options in place; returns self for chaining."""
        self["options"].update(options)
        return self

    def clone(self, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None,
              **options: Any) -> Signature:
        """A copy with extra arguments (appended, or ignored when immutable) and options."""
        sig = Signature(copy.deepcopy(dict(self)), app=self._app)
        if not sig.immutable:
            sig["args"] = list(sig["args"]) + list(args or ())
            sig["kwargs"] = {**sig["kwargs"], **(kwargs or {})}
        sig["options"].update(options)
        return sig

    def apply_async(self, args: Sequence[Any] | None = None,
                    kwargs: Mapping[str, Any] | None = None, **options: Any) -> AsyncResult[Any]:
        """Send the task; ``args`` are prepended to the partial ones unless immutable."""
        app = self._resolve_app()
        if self.immutable:
            call_args, call_kwargs = self.args, self.kwargs
        else:
            call_args = list(args or ()) + self.args
            call_kwargs = {**self.kwargs, **(kwargs or {})}
        merged = {**self.options, **options}
        task = app.tasks.get(self.name)
        if task is not None:
            return task.apply_async(call_args, call_kwargs, **merged)
        return app.send_task(self.name, call_args, call_kwargs, **merged)

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult[Any]:
        """``apply_async(args, kwargs)``."""
        return self.apply_async(args, kwargs)

    def _resolve_app(self) -> Taskframe:
        if self._app is not None:
            return self._app
        from taskframe.app import current_app

        return current_app()

    def __json__(self) -> dict[str, Any]:
        return dict(self)

    def __repr__(self) -> str:
        args = ", ".join([repr(a) for a in self["args"]] +
                         [f"{k}={v!r}" for k, v in self["kwargs"].items()])
        return f"{self['task']}{'!' if self.immutable else ''}({args})"


def signature(task: str | Mapping[str, Any], args: Sequence[Any] | None = None,
              kwargs: Mapping[str, Any] | None = None, **options: Any) -> Signature:
    """Build a signature from a task name or a signature dict (Celery's ``signature``)."""
    if isinstance(task, Signature):
        return task
    return Signature(task, args, kwargs, options)
