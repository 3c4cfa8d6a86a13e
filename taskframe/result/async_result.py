"""Result handles: ``AsyncResult`` and ``EagerResult`` (groups: ``taskframe.result_group``).

``get()`` waits for the task, returns its value, and re-raises its exception
(as its own type, or a stand-in class of the same name when that type cannot be
found here). A ready meta is cached in the handle: it cannot change any more.

``then(callback)`` callbacks: nothing runs in the background. A callback
registered on a handle is called (once, with the handle) the first time that
handle *sees* its result ready: in ``get``/``wait``/``join``, or any read that
finds it ready (``state``, ``ready()``, ``result``, ...). If the handle already
knows it is ready, the callback runs at once, inside ``then``. An exception a
callback raises goes to ``on_error`` when given, else it is logged.

``ResultSet`` and ``GroupResult`` live in ``taskframe.result_group`` and are
importable from here too (``from taskframe.result import GroupResult``, as from
``celery.result``), lazily, so the two modules do not import each other at load.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeAlias, TypeVar

from taskframe import states
from taskframe.context import current_request
from taskframe.current import current_app
from taskframe.errors import IncompleteStream
from taskframe.protocol.results import ResultMeta, decode_result, result_tuple

if TYPE_CHECKING:
    from taskframe.backends.base import Backend
    from taskframe.client.app import Taskframe
    from taskframe.result.group import GroupResult

__all__ = ["AsyncResult", "EagerResult", "set_tuple_reader"]

logger = logging.getLogger("taskframe.result")

R = TypeVar("R")
#: What a group or a result set holds: task results and nested groups.
Member: TypeAlias = "AsyncResult[Any] | GroupResult"
Callback: TypeAlias = Callable[[Any], Any]
TupleReader: TypeAlias = "Callable[..., AsyncResult[Any] | GroupResult]"

# How a result is rebuilt from Celery's tuple form (a task's ``children`` may be groups):
# ``result.group``, which imports this module, gives it with ``set_tuple_reader``.
_read_tuple: TupleReader


def set_tuple_reader(reader: TupleReader) -> None:
    """Install the reader of Celery's result tuples (``result_from_tuple``)."""
    global _read_tuple
    _read_tuple = reader


def check_blocking(disable_sync_subtasks: bool) -> None:
    """Refuse to wait for results inside a running task (shared with ``result_group``).

    Raises:
        RuntimeError: called from a task, with ``disable_sync_subtasks``.
    """
    if disable_sync_subtasks and current_request() is not None:
        raise RuntimeError(
            "Never call result.get() within a task: it can deadlock the worker. "
            "Use a chain or pass disable_sync_subtasks=False if you must."
        )


def fire_callbacks(handle: Any, callbacks: list[tuple[Callback, Callback | None]]) -> None:
    """Call each ``then`` callback with ``handle``; errors go to ``on_error`` or the log."""
    for callback, on_error in callbacks:
        try:
            callback(handle)
        except Exception as exc:  # one callback's failure must not lose the result
            if on_error is None:
                logger.exception("then() callback %r of %r raised", callback, handle)
            else:
                on_error(exc)


class AsyncResult(Generic[R]):
    """The result of a task sent to a worker, read from the result backend.

    Args:
        id: the task id.
        app: the app whose backend is read (default: the current app).
        backend: read this backend instead of the app's.
        task_name: the task's name, when known.
        parent: the result of the task that came before this one (a chain's
            previous step), as Celery's ``parent`` attribute.
    """

    def __init__(self, id: str, *, app: Taskframe | None = None,
                 backend: Backend | None = None, task_name: str | None = None,
                 parent: Member | None = None) -> None:
        self.id = id
        self.task_name = task_name
        self.parent = parent
        self._app = app
        self._backend = backend
        self._meta: ResultMeta | None = None
        self._children: list[Member] | None = None
        self._callbacks: list[tuple[Callback, Callback | None]] = []

    @property
    def app(self) -> Taskframe:
        """The app whose backend this result reads."""
        if self._app is None:
            self._app = current_app()
        return self._app

    @property
    def backend(self) -> Backend:
        """The result backend."""
        if self._backend is None:
            self._backend = self.app.backend
        return self._backend

    # -- meta and cache -------------------------------------------------------------

    def _get_meta(self) -> ResultMeta:
        if self._meta is not None:
            return self._meta
        meta = self.backend.get_task_meta(self.id)
        self._set_meta(meta)
        return meta

    def _set_meta(self, meta: ResultMeta) -> None:
        """Keep ``meta`` when it is final and run the ``then`` callbacks (once)."""
        if self._meta is None and meta.get("status") in states.READY_STATES:
            self._meta = meta
            callbacks, self._callbacks = self._callbacks, []
            fire_callbacks(self, callbacks)

    def then(self, callback: Callback, on_error: Callback | None = None) -> None:
        """Call ``callback(self)`` once this handle sees the task ready.

        Nothing polls in the background: the callback runs inside the call that
        first finds the result ready (``get``, ``wait``, ``ready()``, ``state``,
        a group's ``join``, ...), or at once if that already happened.

        Args:
            callback: called with this ``AsyncResult``.
            on_error: called with the exception if ``callback`` raises (else the
                exception is logged).
        """
        if self._meta is not None:
            fire_callbacks(self, [(callback, on_error)])
        else:
            self._callbacks.append((callback, on_error))

    def get(self, timeout: float | None = None, propagate: bool = True, interval: float = 0.5,
            disable_sync_subtasks: bool = True) -> R:
        """Wait until the task is ready and return its value.

        Args:
            timeout: seconds to wait; ``taskframe.errors.TimeoutError`` after that.
            propagate: re-raise the task's exception (FAILURE, REVOKED).
            interval: the longest pause between polls, for backends that poll.
            disable_sync_subtasks: refuse to wait inside a running task (deadlock risk).
        """
        check_blocking(disable_sync_subtasks)
        if self._meta is None:
            self._set_meta(self.backend.wait_for(self.id, timeout=timeout, interval=interval))
        assert self._meta is not None  # wait_for returns a ready meta
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

    def maybe_throw(self, propagate: bool = True,
                    callback: Callable[[str, Any], Any] | None = None) -> Any:
        """Re-raise the task's exception if it failed; else return its current value.

        Does not wait. With ``callback``, calls ``callback(task_id, value)`` first
        when nothing is raised.
        """
        value = self._value(self._get_meta(), propagate)
        if callback is not None:
            callback(self.id, value)
        return value

    maybe_reraise = maybe_throw

    def exists(self) -> bool:
        """True when the backend holds a record for this task (whatever its state).

        Tells a queued task from an id never stored, forgotten or expired:
        both read as PENDING.
        """
        return self.backend.task_result_exists(self.id)

    def _known_ready(self) -> bool:
        return self._meta is not None

    # -- state ----------------------------------------------------------------------

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

    @property
    def name(self) -> str | None:
        """The task name stored with ``result_extended`` (else ``task_name``)."""
        name = self._get_meta().get("name")
        return str(name) if name else self.task_name

    @property
    def args(self) -> Any:
        """The positional arguments stored with ``result_extended``."""
        return self._get_meta().get("args")

    @property
    def kwargs(self) -> Any:
        """The keyword arguments stored with ``result_extended``."""
        return self._get_meta().get("kwargs")

    @property
    def worker(self) -> str | None:
        """The worker that ran the task (``result_extended``)."""
        return self._get_meta().get("worker")

    @property
    def retries(self) -> int | None:
        """How many times the task was retried (``result_extended``)."""
        return self._get_meta().get("retries")

    @property
    def queue(self) -> str | None:
        """The queue the task was delivered from (``result_extended``)."""
        return self._get_meta().get("queue")

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
        self._children = None
        self.backend.forget(self.id)

    def revoke(self, connection: Any = None, terminate: bool = False, signal: str = "SIGTERM",
               wait: bool = False, timeout: float | None = None) -> None:
        """Revoke this task on every worker (and on those started later).

        Args:
            connection: a broker ``Connection`` to use (a new one when None).
            terminate: also stop it if it runs now (``should_abort()`` on threads/solo).
            signal: the signal for ``terminate`` (``"SIGKILL"``, ...).
            wait: wait up to ``timeout`` seconds (default 1) for the workers' replies.
        """
        self.app.control.revoke(self.id, connection=connection, terminate=terminate,
                                signal=signal, reply=wait, timeout=timeout or 1.0)

    # -- the task graph -------------------------------------------------------------

    @property
    def children(self) -> list[Member]:
        """Results of the tasks this task started (stored as its meta's ``children``)."""
        if self._children is not None:
            return self._children
        children = [_read_tuple(child, app=self._app, backend=self._backend)
                    for child in self._get_meta().get("children") or []]
        if self._meta is not None:
            self._children = children  # final: the meta will not change
        return children

    def iterdeps(self, intermediate: bool = False) -> Iterator[tuple[Member | None, Member]]:
        """Walk this result and its children, breadth first: ``(parent, node)`` pairs.

        Raises:
            IncompleteStream: a node is not ready (unless ``intermediate``).
        """
        stack: deque[tuple[Member | None, Member]] = deque([(None, self)])
        while stack:
            parent, node = stack.popleft()
            yield parent, node
            if node.ready():
                stack.extend((node, child) for child in node.children)
            elif not intermediate:
                raise IncompleteStream(f"{node!r} is not ready")

    def collect(self, intermediate: bool = False, **kwargs: Any) -> Iterator[tuple[Member, Any]]:
        """Wait for this task and every task it started: ``(result, value)`` pairs.

        Follows ``children`` breadth first, waiting for each node with
        ``get(**kwargs)`` before looking at its children.
        """
        for _, node in self.iterdeps(intermediate=intermediate):
            yield node, node.get(**kwargs)

    def get_leaf(self) -> Any:
        """The value of the last node ``collect`` reaches."""
        value = None
        for _, node in self.iterdeps():
            value = node.get()
        return value

    def as_tuple(self) -> list[Any]:
        """Celery's tuple of this result: ``[[id, parent_tuple], None]``."""
        return result_tuple(self.id, None if self.parent is None else self.parent.as_tuple())

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
        return f"<{type(self).__name__}: {self.id}>"


class EagerResult(AsyncResult[R]):
    """The result of a task run in this process (``apply()`` or ``task_always_eager``)."""

    def __init__(self, id: str, retval: Any, state: str,
                 traceback: str | None = None, *, task_name: str | None = None) -> None:
        super().__init__(id, task_name=task_name)
        self._retval = retval
        self._state = state
        self._traceback = traceback
        self._meta = {"status": state, "result": retval, "traceback": traceback,
                      "children": [], "date_done": None, "task_id": id}

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
