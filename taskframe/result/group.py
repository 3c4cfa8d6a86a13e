"""Results of several tasks: ``ResultSet`` and ``GroupResult``.

A ``ResultSet`` is ready when every member is; ``get()`` returns the members'
values in order. A ``GroupResult`` (what a group returns) has an id and can be
saved and restored: it is stored in Celery's wire form (``[[group_id, parent],
[member tuples]]``, ../shared/spec/celery-wire.md §6.1) through the backend's
``save_group``, so Celery's ``GroupResult.restore`` reads ours and
``GroupResult.restore`` here reads Celery's.

Waiting: on backends that push (Redis, memory) ``get`` waits for each member in
turn (``join``); on backends that poll (database, GCS) it reads every unready
member in one bulk read per round (``join_native``, the backend's
``get_task_metas``).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from taskframe.current import current_app
from taskframe.errors import ResultError
from taskframe.errors import TimeoutError as ResultTimeout
from taskframe.protocol.results import group_tuple
from taskframe.result.async_result import (
    AsyncResult,
    Callback,
    Member,
    check_blocking,
    fire_callbacks,
    set_tuple_reader,
)

if TYPE_CHECKING:
    from taskframe.backends.base import Backend
    from taskframe.client.app import Taskframe

__all__ = ["GroupResult", "ResultSet", "result_from_tuple"]


class ResultSet:
    """Several results handled as one: ready when all are, ``get`` returns every value.

    Args:
        results: the member results (``AsyncResult`` or nested ``GroupResult``).
        app: the app whose backend is read (default: the first member's, else
            the current app's).
        backend: the backend to read when the set has no members yet
            (default: the app's).
    """

    def __init__(self, results: Iterable[Member] | None = None, *,
                 app: Taskframe | None = None, backend: Backend | None = None) -> None:
        self.results: list[Member] = results if isinstance(results, list) else list(results or ())
        self._app = app
        self._backend = backend
        self._callbacks: list[tuple[Callback, Callback | None]] = []

    @property
    def app(self) -> Taskframe:
        """The app: given, else the first member's, else the current app."""
        if self._app is None:
            if self.results:
                self._app = self.results[0].app
            else:
                self._app = current_app()
        return self._app

    @property
    def backend(self) -> Backend:
        """The backend of the first member (else the one given, else the app's)."""
        if self.results:
            return self.results[0].backend
        return self._backend if self._backend is not None else self.app.backend

    # -- membership -----------------------------------------------------------------

    def add(self, result: Member) -> None:
        """Add ``result``, unless it is a member already."""
        if result not in self.results:
            self.results.append(result)

    def remove(self, result: Member | str) -> None:
        """Remove a member (a result or a task id).

        Raises:
            KeyError: it is not a member.
        """
        try:
            self.results.remove(result)  # type: ignore[arg-type]  # ids equal their results
        except ValueError:
            raise KeyError(result) from None

    def discard(self, result: Member | str) -> None:
        """Remove a member, if it is one."""
        with contextlib.suppress(KeyError):
            self.remove(result)

    def update(self, results: Iterable[Member]) -> None:
        """Add every result of ``results`` that is not a member yet."""
        for result in results:
            self.add(result)

    def clear(self) -> None:
        """Remove every member (the list object is kept)."""
        self.results.clear()

    # -- state ----------------------------------------------------------------------

    def ready(self) -> bool:
        """True when every member is ready."""
        done = all(result.ready() for result in self.results)
        if done:
            self._fire()
        return done

    def successful(self) -> bool:
        """True when every member succeeded."""
        return all(result.successful() for result in self.results)

    def failed(self) -> bool:
        """True when any member failed."""
        return any(result.failed() for result in self.results)

    def waiting(self) -> bool:
        """True when any member is not ready yet."""
        return not self.ready()

    def completed_count(self) -> int:
        """How many members succeeded (Celery's meaning of "completed")."""
        return sum(1 for result in self.results if result.successful())

    def maybe_throw(self, propagate: bool = True,
                    callback: Callable[[str, Any], Any] | None = None) -> None:
        """Re-raise the first failed member's exception (in member order). Does not wait."""
        for result in self.results:
            result.maybe_throw(propagate=propagate, callback=callback)

    def forget(self) -> None:
        """Forget every member's stored result."""
        for result in self.results:
            result.forget()

    def revoke(self, connection: Any = None, terminate: bool = False, signal: str = "SIGTERM",
               wait: bool = False, timeout: float | None = None) -> None:
        """Revoke every member on every worker (and on those started later), in one message.

        Args: as ``AsyncResult.revoke``.
        """
        ids = [result.id for result in self.results]
        if ids:
            self.app.control.revoke(ids, connection=connection, terminate=terminate,
                                    signal=signal, reply=wait, timeout=timeout or 1.0)

    @property
    def children(self) -> list[Member]:
        """The members (for ``iterdeps``/``collect`` walking through a group)."""
        return self.results

    def then(self, callback: Callback, on_error: Callback | None = None) -> None:
        """Call ``callback(self)`` once this set is seen with every member ready.

        Same rules as ``AsyncResult.then``: run by ``get``/``join``/``ready()``,
        at once when the set is already known to be ready.
        """
        self._callbacks.append((callback, on_error))
        if self._known_ready():
            self._fire()

    def _known_ready(self) -> bool:
        return all(result._known_ready() for result in self.results)

    def _fire(self) -> None:
        callbacks, self._callbacks = self._callbacks, []
        fire_callbacks(self, callbacks)

    # -- waiting --------------------------------------------------------------------

    def get(self, timeout: float | None = None, propagate: bool = True, interval: float = 0.5,
            callback: Callable[[str, Any], Any] | None = None,
            disable_sync_subtasks: bool = True) -> list[Any]:
        """Wait for every member; their values in member order.

        Uses ``join`` (one pushed wait per member) on backends that push
        (Redis, memory, rpc), else ``join_native`` (bulk reads). When every member
        is already known to be ready (eager results), the backend is not touched.
        """
        pushed = self._known_ready() or self.backend.supports_push
        join = self.join if pushed else self.join_native
        return join(timeout=timeout, propagate=propagate, interval=interval,
                    callback=callback, disable_sync_subtasks=disable_sync_subtasks)

    def join(self, timeout: float | None = None, propagate: bool = True, interval: float = 0.5,
             callback: Callable[[str, Any], Any] | None = None,
             disable_sync_subtasks: bool = True) -> list[Any]:
        """Wait for each member in turn; their values in member order.

        Args:
            timeout: seconds for the whole set; ``TimeoutError`` after that.
            propagate: re-raise the first failed member's exception (in member
                order); else its place holds the exception.
            interval: the longest pause between polls, for backends that poll.
            callback: called as ``callback(task_id, value)`` for each member;
                the returned list is then empty.
            disable_sync_subtasks: refuse to wait inside a running task.
        """
        check_blocking(disable_sync_subtasks)
        deadline = None if timeout is None else time.monotonic() + timeout
        values: list[Any] = []
        for result in self.results:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            value = result.get(timeout=remaining, propagate=propagate, interval=interval,
                               disable_sync_subtasks=False)
            if callback is not None:
                callback(result.id, value)
            else:
                values.append(value)
        self._fire()
        return values

    def join_native(self, timeout: float | None = None, propagate: bool = True,
                    interval: float = 0.5, callback: Callable[[str, Any], Any] | None = None,
                    disable_sync_subtasks: bool = True) -> list[Any]:
        """Like ``join``, but polls every unready member with one bulk read.

        Each round reads all members still unready with the backend's
        ``get_task_metas`` (one ``MGET`` on Redis, one ``SELECT ... IN`` on a
        database, parallel downloads on GCS), with backoff from 5 ms up to
        ``interval`` between rounds. Nested groups are joined in turn afterwards.
        """
        check_blocking(disable_sync_subtasks)
        deadline = None if timeout is None else time.monotonic() + timeout
        sleep = 0.005
        while True:
            waiting = [r for r in self.results if isinstance(r, AsyncResult) and r._meta is None]
            by_backend: dict[int, tuple[Backend, list[AsyncResult[Any]]]] = {}
            for result in waiting:
                by_backend.setdefault(id(result.backend), (result.backend, []))[1].append(result)
            for backend, members in by_backend.values():
                metas = backend.get_task_metas([r.id for r in members])
                for member in members:
                    member._set_meta(metas[member.id])
            if all(r._meta is not None for r in waiting):
                break
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    left = sum(1 for r in waiting if r._meta is None)
                    raise ResultTimeout(f"{left} of {len(self.results)} results not ready "
                                        f"after {timeout} s")
                sleep = min(sleep, remaining)
            time.sleep(sleep)
            sleep = min(sleep * 2, interval)
        rest = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        return self.join(timeout=rest, propagate=propagate, interval=interval,
                         callback=callback, disable_sync_subtasks=False)

    # -- container ------------------------------------------------------------------

    def __iter__(self) -> Iterator[Member]:
        return iter(self.results)

    def __getitem__(self, index: int) -> Member:
        return self.results[index]

    def __len__(self) -> int:
        return len(self.results)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ResultSet):
            return other.results == self.results
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by members

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: [{', '.join(str(r) for r in self.results)}]>"


class GroupResult(ResultSet):
    """The result of a group: a ``ResultSet`` with an id, which can be saved and restored.

    Args:
        id: the group id (a new uuid when ``None``).
        results: the member results.
        parent: the result that came before the group (in a chain).
        app: the app whose backend is read.
    """

    def __init__(self, id: str | None = None, results: Iterable[Member] | None = None,
                 parent: Member | None = None, *, app: Taskframe | None = None,
                 backend: Backend | None = None) -> None:
        super().__init__(results, app=app, backend=backend)
        self.id: str = id or str(uuid.uuid4())
        self.parent = parent

    def as_tuple(self) -> list[Any]:
        """Celery's tuple: ``[[id, parent_tuple], [member tuples...]]``."""
        return group_tuple(self.id, [result.as_tuple() for result in self.results],
                           None if self.parent is None else self.parent.as_tuple())

    def save(self, backend: Backend | None = None) -> GroupResult:
        """Store the group (Celery's tuple) so ``GroupResult.restore(id)`` finds it."""
        (backend or self.backend).save_group(self.id, self.as_tuple())
        return self

    def delete(self, backend: Backend | None = None) -> None:
        """Delete the saved group (the members' results stay)."""
        (backend or self.backend).delete_group(self.id)

    @classmethod
    def restore(cls, id: str, backend: Backend | None = None,
                app: Taskframe | None = None) -> GroupResult | None:
        """The group saved under ``id`` (by us or by Celery), or ``None``.

        Raises:
            ResultError: the stored value is a task result, not a group.
        """
        if backend is None:
            if app is None:
                app = current_app()
            backend = app.backend
        stored = backend.restore_group(id)
        if stored is None:
            return None
        group = result_from_tuple(stored, app=app, backend=backend)
        if not isinstance(group, GroupResult):
            raise ResultError(f"the stored group {id!r} is not a group: {stored!r}")
        return group

    def __eq__(self, other: object) -> bool:
        if isinstance(other, GroupResult):
            return other.id == self.id and other.results == self.results
        if isinstance(other, str):
            return other == self.id
        return NotImplemented

    __hash__ = None

    def __bool__(self) -> bool:
        return True  # a group with no members is still a group (len() would say False)

    def __str__(self) -> str:
        return self.id

    def __repr__(self) -> str:
        return f"<GroupResult: {self.id} [{', '.join(str(r) for r in self.results)}]>"


def result_from_tuple(value: Any, *, app: Taskframe | None = None,
                      backend: Backend | None = None) -> Member:
    """Rebuild a result from Celery's tuple form (``as_tuple()``, meta ``children``).

    ``[[id, parent], None]`` is an ``AsyncResult``; ``[[id, parent], [members]]`` a
    ``GroupResult``. A bare id string is an ``AsyncResult``.
    """
    if isinstance(value, AsyncResult | GroupResult):
        return value
    if isinstance(value, str):
        return AsyncResult(value, app=app, backend=backend)
    head, nodes = value
    task_id, parent_tuple = (head[0], head[1]) if isinstance(head, list | tuple) else (head, None)
    parent = (None if not parent_tuple
              else result_from_tuple(parent_tuple, app=app, backend=backend))
    if nodes is not None:
        members = [result_from_tuple(node, app=app, backend=backend) for node in nodes]
        return GroupResult(task_id, members, parent, app=app, backend=backend)
    return AsyncResult(task_id, app=app, backend=backend, parent=parent)


set_tuple_reader(result_from_tuple)
