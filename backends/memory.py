"""In-process result backend (``memory://``).

Features: results live in a dict of this process, guarded by one lock; ``wait_for``
is woken by a condition variable the moment a ready result is stored
(``supports_push``); counters for chords; ``cleanup`` by ``date_done``.
Nothing survives the process and nothing is shared with other processes: use it
for tests, eager mode and single-process apps.

URL: ``memory://`` (anything after the scheme is ignored).

Options: ``BackendOptions.expires`` and ``failure_expires`` (for ``cleanup``) and
``extended``.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

from taskframe import states
from taskframe.backends.base import Backend, BackendOptions
from taskframe.errors import TimeoutError as ResultTimeout
from taskframe.protocol.results import ResultContext, ResultMeta, make_meta

__all__ = ["MemoryBackend"]


class MemoryBackend(Backend):
    """Results in a process-local dict; thread-safe."""

    schemes: ClassVar[tuple[str, ...]] = ("memory",)
    supports_push: ClassVar[bool] = True

    def __init__(self, url: str = "memory://", options: BackendOptions | None = None) -> None:
        super().__init__(url, options)
        self._changed = threading.Condition()
        self._metas: dict[str, ResultMeta] = {}
        self._groups: dict[str, Any] = {}
        self._counters: dict[str, int] = {}
        self._revokes: dict[str, float] = {}
        self._revokes_version = 0

    def store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        *,
        traceback: str | None = None,
        context: ResultContext | None = None,
    ) -> ResultMeta:
        """Store ``state``/``result``; a stored SUCCESS is kept and returned instead."""
        meta = make_meta(task_id, state, result, traceback=traceback, context=context,
                         extended=self.options.extended)
        with self._changed:
            current = self._metas.get(task_id)
            if current is not None and current["status"] == states.SUCCESS:
                return copy.deepcopy(current)
            # Deep copies on the way in and out: callers must not be able to
            # change a stored result by mutating what they passed or got back.
            self._metas[task_id] = copy.deepcopy(meta)
            self._changed.notify_all()
        return meta

    def get_task_meta(self, task_id: str) -> ResultMeta:
        """The stored meta, or a PENDING meta."""
        with self._changed:
            meta = self._metas.get(task_id)
            if meta is not None:
                return copy.deepcopy(meta)
        return make_meta(task_id, states.PENDING, None)

    def wait_for(
        self, task_id: str, timeout: float | None = None, interval: float = 0.5
    ) -> ResultMeta:
        """Block until ``task_id`` is ready, woken by ``store_result``.

        Raises:
            taskframe.errors.TimeoutError: not ready within ``timeout``.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while True:
                meta = self._metas.get(task_id)
                if meta is not None and meta["status"] in states.READY_STATES:
                    return copy.deepcopy(meta)
                if deadline is None:
                    self._changed.wait()
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ResultTimeout(f"task {task_id} not ready after {timeout} s")
                self._changed.wait(remaining)

    def get_task_metas(self, task_ids: Iterable[str]) -> dict[str, ResultMeta]:
        """The metas of ``task_ids`` under one lock (PENDING metas for unknown ids)."""
        found: dict[str, ResultMeta] = {}
        with self._changed:
            for task_id in task_ids:
                meta = self._metas.get(task_id)
                found[task_id] = (make_meta(task_id, states.PENDING, None) if meta is None
                                  else copy.deepcopy(meta))
        return found

    def task_result_exists(self, task_id: str) -> bool:
        """True when a meta is stored for ``task_id``."""
        with self._changed:
            return task_id in self._metas

    def forget(self, task_id: str) -> None:
        """Delete the stored meta of ``task_id``."""
        with self._changed:
            self._metas.pop(task_id, None)

    def save_group(self, group_id: str, result: Any) -> None:
        """Store a group's result tuple."""
        with self._changed:
            self._groups[group_id] = (copy.deepcopy(result), datetime.now(UTC))

    def restore_group(self, group_id: str) -> Any | None:
        """The stored group tuple, or ``None``."""
        with self._changed:
            entry = self._groups.get(group_id)
            return None if entry is None else copy.deepcopy(entry[0])

    def delete_group(self, group_id: str) -> None:
        """Delete a stored group."""
        with self._changed:
            self._groups.pop(group_id, None)

    def incr(self, key: str) -> int:
        """Add one to counter ``key`` and return the new value."""
        with self._changed:
            value = self._counters.get(key, 0) + 1
            self._counters[key] = value
            return value

    def delete_counter(self, key: str) -> None:
        """Delete counter ``key``."""
        with self._changed:
            self._counters.pop(key, None)

    def add_revokes(self, entries: Mapping[str, float]) -> None:
        """Record revoked ids (each keeps its later expiry), under the lock."""
        with self._changed:
            for task_id, expires_at in entries.items():
                self._revokes[task_id] = max(expires_at, self._revokes.get(task_id, 0.0))
            self._revokes_version += 1

    def load_revokes(self) -> dict[str, float]:
        """The revoked ids not expired yet."""
        now = time.time()
        with self._changed:
            return {i: at for i, at in self._revokes.items() if at > now}

    def revokes_version(self) -> str | None:
        """How many times ids were added."""
        return str(self._revokes_version)

    def cleanup(self) -> int:
        """Delete task and group results whose ``date_done`` is older than they are kept.

        FAILURE results are kept ``failure_expires`` when that is set, others ``expires``.
        """
        now = datetime.now(UTC)
        with self._changed:
            old_tasks = [tid for tid, meta in self._metas.items() if self._expired(meta, now)]
            for tid in old_tasks:
                del self._metas[tid]
            if self.options.expires is None:
                return len(old_tasks)
            cutoff = now - timedelta(seconds=self.options.expires)
            old_groups = [gid for gid, (_, done) in self._groups.items() if done < cutoff]
            for gid in old_groups:
                del self._groups[gid]
        return len(old_tasks) + len(old_groups)

    def _expired(self, meta: ResultMeta, now: datetime) -> bool:
        keep = self.expires_for(str(meta.get("status")))
        done = meta.get("date_done")
        if keep is None or not done:
            return False
        return datetime.fromisoformat(str(done)) < now - timedelta(seconds=keep)
