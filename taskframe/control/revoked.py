"""The revoked set: bounded in memory, kept in a ``--statedb`` file, shared through a store.

Celery keeps revokes in worker memory only, so a revoke sent while no worker
runs is lost, and so is every revoke when the workers restart. taskframe keeps
three copies:

* ``RevokedSet``: the worker's in-memory set, bounded by ``worker_revoked_max``
  (the oldest entries go first); each id expires ``worker_revoked_expires``
  seconds after it was revoked. Expiry times are wall-clock (unix) seconds, so
  they mean the same in every process and file.
* ``StateDB``: a JSON file (``--statedb``) written after each change and read at
  start, so one worker's set survives its restart.
* ``RevokeStore``: the ids kept in the result backend (``Backend.add_revokes``,
  each id written atomically), written by every revoke (client or worker), read by
  every worker at start and caught up on after its control link comes back and every
  ``worker_revoked_sync_interval`` seconds (``control_server.revoke_sync``), so a
  revoke sent while a worker was offline, or could not hear it, still applies.

A revoke also stores REVOKED as the task's state (``mark_revoked``): a task with an
ETA reads it before it runs, so an ETA further away than every revoke memory is still
not run (``taskframe.execution.revoked``).
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from taskframe import states
from taskframe.backends.base import live_revokes

if TYPE_CHECKING:
    from taskframe.backends.base import Backend
    from taskframe.client.app import Taskframe

__all__ = ["REVOCABLE_STATES", "RevokeStore", "RevokedSet", "StateDB", "mark_revoked",
           "revoked_ids", "store_for"]

logger = logging.getLogger("taskframe.control.revoked")

DEFAULT_MAX = 50000
DEFAULT_EXPIRES = 10800.0
#: Stored states a revoke may overwrite with REVOKED (never a finished or running task).
REVOCABLE_STATES = frozenset({states.PENDING, states.RECEIVED, states.RETRY, states.REJECTED})


class RevokedSet:
    """Revoked task ids with their expiry times, bounded, safe to use from any thread.

    Args:
        maxlen: most ids kept (oldest dropped first); 0 = no bound.
        expires: seconds an id stays revoked.
    """

    def __init__(self, maxlen: int = DEFAULT_MAX, expires: float = DEFAULT_EXPIRES) -> None:
        self.maxlen = maxlen
        self.expires = expires
        self._ids: collections.OrderedDict[str, float] = collections.OrderedDict()
        #: stamped-header revokes: header name -> revoked values.
        self.stamps: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def add(self, task_id: str, expires_at: float | None = None) -> None:
        """Revoke ``task_id`` (until ``expires_at``, default ``now + expires``)."""
        self.update({task_id: expires_at if expires_at is not None
                     else time.time() + self.expires})

    def update(self, entries: Mapping[str, float]) -> int:
        """Merge ``{task_id: expires_at}`` entries (already expired ones are skipped).

        Returns:
            How many ids were new.
        """
        now = time.time()
        added = 0
        with self._lock:
            for task_id, expires_at in entries.items():
                if expires_at <= now:
                    continue
                known = self._ids.pop(task_id, None)
                added += known is None
                self._ids[task_id] = max(expires_at, known or 0.0)
            self._purge(now)
        return added

    def add_stamps(self, headers: Mapping[str, Any]) -> None:
        """Revoke by stamped headers: ``{name: value or [values]}``."""
        with self._lock:
            for name, value in headers.items():
                values = value if isinstance(value, list | tuple | set) else [value]
                self.stamps.setdefault(str(name), set()).update(str(v) for v in values)

    def matches_stamps(self, stamps: Mapping[str, Any]) -> bool:
        """True when one of a task's ``stamps`` was revoked."""
        if not self.stamps or not stamps:
            return False
        with self._lock:
            for name, value in stamps.items():
                revoked = self.stamps.get(name)
                if not revoked:
                    continue
                values = value if isinstance(value, list | tuple) else [value]
                if any(str(v) in revoked for v in values):
                    return True
        return False

    def _purge(self, now: float) -> None:
        expired = [i for i, at in self._ids.items() if at <= now]
        for task_id in expired:
            del self._ids[task_id]
        while self.maxlen and len(self._ids) > self.maxlen:
            self._ids.popitem(last=False)

    def discard(self, task_id: str) -> None:
        """Forget ``task_id``."""
        with self._lock:
            self._ids.pop(task_id, None)

    def __contains__(self, task_id: object) -> bool:
        with self._lock:
            expires_at = self._ids.get(task_id) if isinstance(task_id, str) else None
        return expires_at is not None and expires_at > time.time()

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids())

    def ids(self) -> list[str]:
        """The ids revoked now, oldest first."""
        now = time.time()
        with self._lock:
            return [i for i, at in self._ids.items() if at > now]

    def entries(self) -> dict[str, float]:
        """``{task_id: expires_at}`` for the ids revoked now."""
        now = time.time()
        with self._lock:
            return {i: at for i, at in self._ids.items() if at > now}


class StateDB:
    """The ``--statedb`` file: the revoked set as JSON, replaced atomically on each save."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()

    def load(self) -> dict[str, float]:
        """The stored ``{task_id: expires_at}`` (empty when the file is missing or unreadable)."""
        try:
            with open(self.path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            logger.warning("cannot read the state db %s: %s; starting empty", self.path, exc)
            return {}
        revoked = data.get("revoked") if isinstance(data, dict) else None
        return live_revokes(revoked)

    def save(self, entries: Mapping[str, float] | RevokedSet, clock: int = 0) -> None:
        """Write ``entries`` (and the logical clock) to the file.

        Given the ``RevokedSet`` itself, the ids are read under this file's lock, so
        two threads saving at once never leave the older copy last.
        """
        directory = os.path.dirname(os.path.abspath(self.path))
        with self._lock:
            data = entries.entries() if isinstance(entries, RevokedSet) else dict(entries)
            fd, tmp = tempfile.mkstemp(prefix=".statedb-", dir=directory)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    json.dump({"revoked": data, "clock": clock}, fh)
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise


class RevokeStore:
    """Revoked ids shared through the result backend, with expiry.

    The backend writes each id atomically (``Backend.add_revokes``: a sorted set on
    Redis, rows on SQL, a compare-and-swapped object on GCS), so clients and workers
    revoking at the same time never lose one another's ids.

    Args:
        backend: the result backend (``holds_revokes``).
        maxlen: most ids loaded (those that expire last).
    """

    def __init__(self, backend: Backend, maxlen: int = DEFAULT_MAX) -> None:
        self.backend = backend
        self.maxlen = maxlen

    def load(self) -> dict[str, float]:
        """The ``{task_id: expires_at}`` entries not yet expired."""
        entries = self.backend.load_revokes()
        if self.maxlen and len(entries) > self.maxlen:
            entries = dict(sorted(entries.items(), key=lambda kv: kv[1])[-self.maxlen:])
        return entries

    def add(self, task_ids: Iterable[str], expires: float) -> None:
        """Record ``task_ids`` as revoked for ``expires`` seconds.

        Raises:
            TaskframeError / TransportError: the backend failed (callers log it).
        """
        expires_at = time.time() + expires
        self.backend.add_revokes({task_id: expires_at for task_id in task_ids})

    def version(self) -> str | None:
        """A token that changes with every add (``None``: the backend cannot tell)."""
        return self.backend.revokes_version()


def mark_revoked(backend: Backend, task_ids: Iterable[str]) -> None:
    """Store REVOKED for each id whose stored state is neither final nor running.

    A task that comes back after every revoke memory forgot it (an ETA further away than
    ``worker_revoked_expires``) reads this state before it runs, and is not run.

    Raises:
        TaskframeError / TransportError: the backend failed (callers log it).
    """
    metas = backend.get_task_metas(task_ids)
    for task_id, meta in metas.items():
        if meta.get("status") in REVOCABLE_STATES:
            backend.mark_as_revoked(task_id, "revoked")


def revoked_ids(value: str | Collection[str]) -> list[str]:
    """``task_id`` as Celery sends it (one id or a list) as a list."""
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def store_for(app: Taskframe) -> RevokeStore | None:
    """The shared revoke store of ``app``: its result backend, or ``None`` without one."""
    if app.result_backend_url is None or not app.backend.holds_revokes:
        return None
    return RevokeStore(app.backend, int(app.conf.worker_revoked_max or 0))
