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
* ``RevokeStore``: a record in the result backend (a group entry named
  ``REVOKED_KEY``), written by every revoke (client or worker) and read by every
  worker at start, so a revoke sent while no worker runs still applies. Writers
  merge with what is stored and check their ids landed (a concurrent writer can
  overwrite; the check writes again).
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

if TYPE_CHECKING:
    from taskframe.backends.base import Backend
    from taskframe.client.app import Taskframe

__all__ = ["REVOKED_KEY", "RevokeStore", "RevokedSet", "StateDB", "revoked_ids", "store_for"]

logger = logging.getLogger("taskframe.control.revoked")

#: The backend group id under which revoked task ids are shared.
REVOKED_KEY = "taskframe.revoked"
DEFAULT_MAX = 50000
DEFAULT_EXPIRES = 10800.0
_STORE_ATTEMPTS = 3
# An id already stored with an expiry this close to ours is not written again.
_STORE_SLACK = 60.0


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
        return _entries(revoked)

    def save(self, entries: Mapping[str, float], clock: int = 0) -> None:
        """Write ``entries`` (and the logical clock) to the file."""
        directory = os.path.dirname(os.path.abspath(self.path))
        with self._lock:
            fd, tmp = tempfile.mkstemp(prefix=".statedb-", dir=directory)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    json.dump({"revoked": dict(entries), "clock": clock}, fh)
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise


class RevokeStore:
    """Revoked ids shared through the result backend, with expiry.

    Args:
        backend: the result backend (its group storage holds one record).
        maxlen: most ids kept in the record.
    """

    def __init__(self, backend: Backend, maxlen: int = DEFAULT_MAX) -> None:
        self.backend = backend
        self.maxlen = maxlen

    def load(self) -> dict[str, float]:
        """The ``{task_id: expires_at}`` entries not yet expired."""
        return _entries(self.backend.restore_group(REVOKED_KEY))

    def add(self, task_ids: Iterable[str], expires: float) -> None:
        """Record ``task_ids`` as revoked for ``expires`` seconds.

        Raises:
            TaskframeError / TransportError: the backend failed (callers log it).
        """
        expires_at = time.time() + expires
        wanted = {task_id: expires_at for task_id in task_ids}
        if not wanted:
            return
        for _ in range(_STORE_ATTEMPTS):
            entries = self.load()
            if all(entries.get(i, 0.0) >= at - _STORE_SLACK for i, at in wanted.items()):
                return  # already recorded (by the client that sent the revoke)
            for task_id, at in wanted.items():
                entries[task_id] = max(at, entries.get(task_id, 0.0))
            if self.maxlen and len(entries) > self.maxlen:
                keep = sorted(entries.items(), key=lambda kv: kv[1])[-self.maxlen:]
                entries = dict(keep)
            self.backend.save_group(REVOKED_KEY, {"revoked": entries})
            if set(wanted) <= set(self.load()):
                return
        logger.warning("revoke store: %d id(s) may not have been recorded (concurrent writers)",
                       len(wanted))


def _entries(data: Any) -> dict[str, float]:
    if isinstance(data, dict) and "revoked" in data:
        data = data["revoked"]
    now = time.time()
    if isinstance(data, dict):
        out: dict[str, float] = {}
        for task_id, at in data.items():
            try:
                when = float(at)
            except (TypeError, ValueError):
                continue
            if when > now:
                out[str(task_id)] = when
        return out
    return {}


def revoked_ids(value: str | Collection[str]) -> list[str]:
    """``task_id`` as Celery sends it (one id or a list) as a list."""
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def store_for(app: Taskframe) -> RevokeStore | None:
    """The shared revoke store of ``app``: its result backend, or ``None`` without one."""
    if app.result_backend_url is None:
        return None
    return RevokeStore(app.backend, int(app.conf.worker_revoked_max or 0))
