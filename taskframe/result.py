"""Result handles: ``AsyncResult`` (stored by a worker) and ``EagerResult`` (run here).

``get()`` waits for the task, returns its value, and re-raises its exception
(as its own type, or a stand-in class of the same name when that type cannot be
found here).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generic, TypeVar

from taskframe.context import current_request
from taskframe.protocol import states
from taskframe.protocol.results import ResultMeta, decode_result

if TYPE_CHECKING:
    from taskframe.app import Taskframe
    from taskframe.backends.base import Backend

__all__ = ["AsyncResult", "EagerResult"]

R = TypeVar("R")


class AsyncResult(Generic[R]):
    """The result of a task sent to a worker, read from the result backend."""

    def __init__(self, id: str, *, app: Taskframe | None = None,
                 backend: Backend | None = None, task_name: str | None = None) -> None:
        self.id = id
        self.task_name = task_name
        self._app = app
        self._backend = backend
        self._meta: ResultMeta | None = None

    @property
    def app(self) -> Taskframe:
        """The app whose backend this result reads."""
        if self._app is None:
            from taskframe.app import current_app

            self._app = current_app()
        return self._app

    @property
    def backend(self) -> Backend:
        """The result backend."""
        if self._backend is None:
            self._backend = self.app.backend
        return self._backend

    def _get_meta(self) -> ResultMeta:
        if self._meta is not None:
            return self._meta
        meta = self.backend.get_task_meta(self.id)
        if meta.get("status") in states.READY_STATES:
            self._meta = meta  # final: never changes again
        return meta

    def get(self, timeout: float | None = None, propagate: bool = True, interval: float = 0.5,
            disable_sync_subtasks: bool = True) -> R:
        """Wait until the task is ready and return its value.

        Args:
            timeout: seconds to wait; ``taskframe.errors.TimeoutError`` after that.
            propagate: re-raise the task's exception (FAILURE, REVOKED).
            interval: the longest pause between polls, for backends that poll.
            disable_sync_subtasks: refuse to wait inside a running task (deadlock risk).
        """
        if disable_sync_subtasks and current_request() is not None:
            raise RuntimeError(
                "Never call result.get() within a task: it can deadlock the worker. "
                "Use a chain or pass disable_sync_subtasks=False if you must."
            )
        if self._meta is None:
            self._meta = self.backend.wait_for(self.id, timeout=timeout, interval=interval)
        value: R = self._value(self._meta, propagate)
        return value

    wait = get

    @staticmethod
    def _value(meta: ResultMeta, propagate: bool) -> Any:
        value = decode_result(meta)
        if (propagate and meta.get("status") in states.PROPAGATE_STATES
                and isinstance(value, BaseException)):
            raise value
        return value

    @property
    def state(self) -> str:
        """The current state: PENDING, STARTED, RETRY, SUCCESS, FAILURE, REVOKED, ..."""
        return str(self._get_meta().get("status", states.PENDING))

    status = state

    @property
    def result(self) -> Any:
        """The return value, the exception, or the STARTED meta; None while pending."""
        return decode_result(self._get_meta())

    info = result

    @property
    def traceback(self) -> str | None:
        """The formatted traceback of a failed task."""
        tb = self._get_meta().get("traceback")
        return str(tb) if tb else None

    @property
    def date_done(self) -> str | None:
        """When the task finished (ISO 8601), if it did."""
        value = self._get_meta().get("date_done")
        return str(value) if value else None

    def ready(self) -> bool:
        """True once the task succeeded, failed or was revoked."""
        return self.state in states.READY_STATES

    def successful(self) -> bool:
        """True when the task succeeded."""
        return self.state == states.SUCCESS

    def failed(self) -> bool:
        """True when the task failed."""
        return self.state == states.FAILURE

    def forget(self) -> None:
        """Delete the stored result."""
        self._meta = None
        self.backend.forget(self.id)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, AsyncResult):
            return other.id == self.id
        if isinstance(other, str):
            return other == self.id
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.id)

    def __str__(self) -> str:
        return self.id

    def __repr__(self) -> str:
        return f"<AsyncResult: {self.id}>"


class EagerResult(AsyncResult[R]):
    """The result of a task run in this process (``apply()`` or ``task_always_eager``)."""

    def __init__(self, id: str, retval: Any, state: str,
                 traceback: str | None = None, *, task_name: str | None = None) -> None:
        super().__init__(id, task_name=task_name)
        self._retval = retval
        self._state = state
        self._traceback = traceback

    def get(self, timeout: float | None = None, propagate: bool = True, interval: float = 0.5,
            disable_sync_subtasks: bool = True) -> R:
        """The value, or raise the exception (with ``propagate``)."""
        if (propagate and self._state in states.PROPAGATE_STATES
                and isinstance(self._retval, BaseException)):
            raise self._retval
        return self._retval  # type: ignore[no-any-return]

    wait = get

    @property
    def state(self) -> str:
        """The final state of the eager run."""
        return self._state

    status = state

    @property
    def result(self) -> Any:
        """The return value or the exception."""
        return self._retval

    info = result

    @property
    def traceback(self) -> str | None:
        """The formatted traceback, when the run failed."""
        return self._traceback

    def forget(self) -> None:
        """Nothing is stored for an eager result."""

    def __repr__(self) -> str:
        return f"<EagerResult: {self.id}>"
