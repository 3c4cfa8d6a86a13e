"""The result backend interface: what every result store implements.

A backend stores one *meta* per task (Celery's layout, ../shared/spec/celery-wire.md
§6.1: ``status``, ``result``, ``traceback``, ``children``, ``date_done``,
``task_id`` and, with ``result_extended``, ``name``/``args``/``kwargs``/...),
one meta per saved group, and atomic counters for chords; ``chord_store`` says how
chords are counted.

Backends import ``taskframe.protocol`` (pure data: states, meta, exception
encoding) and their client libraries, never the app or the worker: the app builds
a backend from a URL and a ``BackendOptions``.

Methods:

* ``store_result``: write a task's state and result; never overwrite a stored
  SUCCESS. Exceptions are encoded as Celery does (``exc_type``/``exc_message``/
  ``exc_module``).
* ``get_task_meta``: the stored meta, still encoded (``PENDING`` when unknown).
* ``get_task_metas``: many metas at once (one round trip where the store allows).
* ``task_result_exists``: whether the store holds a record for a task.
* ``wait_for``: block until the task is ready (pushed where the store can push,
  polling with backoff where it cannot).
* ``forget``: delete a task's meta.
* ``save_group`` / ``restore_group`` / ``delete_group``: group results.
* ``incr`` / ``delete_counter``: an atomic counter, for chords.
* ``chord_store``: the ``ChordStore`` that counts chords here (``backends.chord``):
  by default ``incr`` (``chord_counter``), ``None`` without ``implements_incr``
  (Celery's ``celery.chord_unlock`` task then polls).
* ``add_revokes`` / ``load_revokes`` / ``revokes_version``: the revoked task ids
  every client and worker shares (``holds_revokes``), each id added atomically.
* ``on_task_call``: a hook run before a task is sent (``rpc`` declares its
  reply queue there).
* ``cleanup``: delete metas older than ``expires`` (FAILURE metas: older than
  ``failure_expires`` when that is set).
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from taskframe import states
from taskframe.backends.chord import ChordStore
from taskframe.backends.chord_counter import CounterChordStore
from taskframe.protocol.results import ResultContext, ResultMeta
from taskframe.transport import serialization

if TYPE_CHECKING:
    from taskframe.transport.connection import Connection

__all__ = ["REVOKES_GROUP", "Backend", "BackendOptions", "live_revokes"]

#: The group entry that holds revoked ids in backends without a layout of their own.
REVOKES_GROUP = "taskframe.revoked"


def live_revokes(data: Any) -> dict[str, float]:
    """``{task_id: expires_at}`` out of a stored record, without the expired ids."""
    if isinstance(data, dict) and "revoked" in data:
        data = data["revoked"]
    if not isinstance(data, dict):
        return {}
    now = time.time()
    out: dict[str, float] = {}
    for task_id, at in data.items():
        try:
            when = float(at)
        except (TypeError, ValueError):
            continue
        if when > now:
            out[str(task_id)] = when
    return out


@dataclass
class BackendOptions:
    """Settings a backend needs, copied out of the app's configuration.

    Attributes:
        serializer: ``result_serializer`` (``"json"`` by default).
        accept: ``result_accept_content`` (content type names or MIME types).
        expires: ``result_expires`` in seconds; ``None`` keeps results forever.
        failure_expires: ``result_failure_expires`` in seconds: how long FAILURE
            results are kept; ``None`` means ``expires``.
        extended: ``result_extended``: also store name, args, kwargs, worker, ...
        table_names: ``database_table_names`` (``{"task": ..., "group": ...}``).
        engine_options: ``database_engine_options`` passed to ``create_engine``.
        create_tables_at_setup: ``database_create_tables_at_setup``.
        short_lived_sessions: ``database_short_lived_sessions``.
        transport_options: ``result_backend_transport_options``.
        connection: makes a new broker connection (the app's ``connection``);
            for backends that send results through the broker (``rpc``).
        reply_to: the queue this process reads replies from (the app's
            ``origin``, the default ``reply_to`` of the tasks it sends; ``rpc``).
        persistent: ``result_persistent``: replies survive a broker restart (``rpc``).
        max_message_size: ``worker_max_message_size``: the most bytes a stored or sent
            result may decompress to (``None``: no bound).
    """

    serializer: str = "json"
    accept: tuple[str, ...] = ("json",)
    expires: float | None = 86400.0
    failure_expires: float | None = None
    extended: bool = False
    table_names: Mapping[str, str] = field(default_factory=dict)
    engine_options: Mapping[str, Any] = field(default_factory=dict)
    create_tables_at_setup: bool = True
    short_lived_sessions: bool = False
    transport_options: Mapping[str, Any] = field(default_factory=dict)
    connection: Callable[[], Connection] | None = None
    reply_to: str | None = None
    persistent: bool = False
    max_message_size: int | None = serialization.MAX_BODY_SIZE


class Backend(abc.ABC):
    """One result store. Safe to share between threads of one process.

    Class attributes:
        schemes: URL schemes this backend serves.
        supports_push: ``wait_for`` is woken by the store, not by polling.
        implements_incr: ``incr`` is atomic here, so chords are counted with it
            (``chord_store``); False makes chords fall back to ``celery.chord_unlock``
            polling.
        holds_revokes: the store keeps revoked task ids (``add_revokes``); False for
            stores that keep nothing (``rpc``, ``disabled``).
    """

    schemes: ClassVar[tuple[str, ...]] = ()
    supports_push: ClassVar[bool] = False
    implements_incr: ClassVar[bool] = True
    holds_revokes: ClassVar[bool] = True

    def __init__(self, url: str, options: BackendOptions | None = None) -> None:
        self.url = url
        self.options = options or BackendOptions()

    def expires_for(self, state: str) -> float | None:
        """Seconds a result in ``state`` is kept.

        ``failure_expires`` for FAILURE when it is set, else ``expires``.
        """
        if state == states.FAILURE and self.options.failure_expires is not None:
            return self.options.failure_expires
        return self.options.expires

    # -- task results -----------------------------------------------------------------

    @abc.abstractmethod
    def store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        *,
        traceback: str | None = None,
        context: ResultContext | None = None,
    ) -> ResultMeta:
        """Store ``state`` and ``result`` for ``task_id`` and return the meta written.

        ``result`` is the return value, or the exception for FAILURE/RETRY/REVOKED
        (encoded here). A stored SUCCESS is never overwritten: the stored meta is
        returned instead.
        """

    @abc.abstractmethod
    def get_task_meta(self, task_id: str) -> ResultMeta:
        """The stored meta of ``task_id``, or a PENDING meta when none is stored."""

    def get_task_metas(self, task_ids: Iterable[str]) -> dict[str, ResultMeta]:
        """The metas of ``task_ids``, keyed by task id (PENDING metas for unknown ids).

        The default reads them one by one; stores that can read many in one
        round trip (or in parallel) override it.
        """
        return {task_id: self.get_task_meta(task_id) for task_id in dict.fromkeys(task_ids)}

    def task_result_exists(self, task_id: str) -> bool:
        """True when the store holds a record for ``task_id`` (whatever its state).

        Tells a task that is truly pending from an id that was never stored, or
        whose result was forgotten or expired (both read as PENDING). The default
        asks ``get_task_meta`` (so a stored PENDING reads as absent); stores that
        can check for the key or row itself override it.
        """
        return self.get_task_meta(task_id)["status"] != states.PENDING

    def wait_for(
        self, task_id: str, timeout: float | None = None, interval: float = 0.5
    ) -> ResultMeta:
        """Block until ``task_id`` is ready; return its meta.

        The default polls ``get_task_meta`` with backoff from 5 ms up to
        ``interval``; push-capable backends override it.

        Raises:
            taskframe.errors.TimeoutError: not ready within ``timeout``.
        """
        from taskframe.errors import TimeoutError as ResultTimeout

        deadline = None if timeout is None else time.monotonic() + timeout
        sleep = 0.005
        while True:
            meta = self.get_task_meta(task_id)
            if meta["status"] in states.READY_STATES:
                return meta
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ResultTimeout(f"task {task_id} not ready after {timeout} s")
                sleep = min(sleep, remaining)
            time.sleep(sleep)
            sleep = min(sleep * 2, interval)

    @abc.abstractmethod
    def forget(self, task_id: str) -> None:
        """Delete the stored meta of ``task_id`` (no error when there is none)."""

    # -- convenience writers ----------------------------------------------------------

    def mark_as_started(self, task_id: str, *, context: ResultContext | None = None,
                        meta: Mapping[str, Any] | None = None) -> ResultMeta:
        """Store STARTED with ``meta`` (``{"pid": ..., "hostname": ...}``) as result."""
        return self.store_result(task_id, dict(meta or {}), states.STARTED, context=context)

    def mark_as_done(self, task_id: str, result: Any, *,
                     context: ResultContext | None = None) -> ResultMeta:
        """Store SUCCESS with the task's return value."""
        return self.store_result(task_id, result, states.SUCCESS, context=context)

    def mark_as_failure(self, task_id: str, exc: BaseException, *, traceback: str | None = None,
                        context: ResultContext | None = None) -> ResultMeta:
        """Store FAILURE with the exception."""
        return self.store_result(task_id, exc, states.FAILURE, traceback=traceback,
                                 context=context)

    def mark_as_retry(self, task_id: str, exc: BaseException, *, traceback: str | None = None,
                      context: ResultContext | None = None) -> ResultMeta:
        """Store RETRY with the exception that caused the retry."""
        return self.store_result(task_id, exc, states.RETRY, traceback=traceback,
                                 context=context)

    def mark_as_revoked(self, task_id: str, reason: str = "revoked", *,
                        context: ResultContext | None = None) -> ResultMeta:
        """Store REVOKED with ``TaskRevokedError(reason)``, unless the task is already ready."""
        from taskframe.errors import TaskRevokedError

        current = self.get_task_meta(task_id)
        if current["status"] in states.READY_STATES:
            return current
        return self.store_result(task_id, TaskRevokedError(reason), states.REVOKED,
                                 context=context)

    # -- groups and counters ----------------------------------------------------------

    @abc.abstractmethod
    def save_group(self, group_id: str, result: Any) -> None:
        """Store a group's result tuple (``[[gid, parent], [child tuples...]]``)."""

    @abc.abstractmethod
    def restore_group(self, group_id: str) -> Any | None:
        """The stored group result tuple, or ``None``."""

    @abc.abstractmethod
    def delete_group(self, group_id: str) -> None:
        """Delete a stored group (no error when there is none)."""

    @abc.abstractmethod
    def incr(self, key: str) -> int:
        """Atomically add one to counter ``key`` (created at 0) and return the new value."""

    def delete_counter(self, key: str) -> None:  # noqa: B027 - optional, a no-op by default
        """Delete counter ``key`` (no error when there is none); the next ``incr`` gives 1.

        The default keeps it: override where counters would otherwise pile up.
        """

    def chord_store(self) -> ChordStore | None:
        """The store that counts the header tasks of chords here, or ``None``.

        The default counts with ``incr`` (``CounterChordStore``) when
        ``implements_incr``; ``None`` means no atomic counter: Celery's
        ``celery.chord_unlock`` task polls the header's results instead. A backend
        with its own chord layout (Redis: Celery's keys) returns its own store.
        """
        return CounterChordStore(self) if self.implements_incr else None

    # -- revoked task ids ---------------------------------------------------------------

    def add_revokes(self, entries: Mapping[str, float]) -> None:
        """Record ``{task_id: expires_at}`` (unix seconds) as revoked.

        Every backend of taskframe writes each id atomically: clients and workers that
        revoke at the same time never lose one another's ids, and an id recorded twice
        keeps the later expiry. This default, for backends that do not override it,
        reads the record (one group entry), merges and writes it back: a concurrent
        writer can overwrite it.
        """
        merged = self.load_revokes()
        for task_id, expires_at in entries.items():
            merged[task_id] = max(expires_at, merged.get(task_id, 0.0))
        self.save_group(REVOKES_GROUP, {"revoked": merged})

    def load_revokes(self) -> dict[str, float]:
        """Every recorded ``{task_id: expires_at}`` not expired yet."""
        return live_revokes(self.restore_group(REVOKES_GROUP))

    def revokes_version(self) -> str | None:
        """A token that changes whenever ids are added; ``None`` when the store cannot
        tell cheaply (the default). A worker catching up reads it first and loads the ids
        only when it changed."""
        return None

    # -- housekeeping -----------------------------------------------------------------

    def cleanup(self) -> int:
        """Delete metas older than ``options.expires``; return how many. Default: none."""
        return 0

    def on_task_call(self, task_id: str, reply_to: str | None) -> None:  # noqa: B027
        """Called by the app before it sends a task whose result it wants. Default: nothing.

        The ``rpc`` backend declares its reply queue here, so no reply is lost.
        """

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release connections. Idempotent."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"
