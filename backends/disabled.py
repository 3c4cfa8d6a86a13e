"""The backend in force when no ``result_backend`` is configured.

Features: writes are accepted and dropped (a worker can run tasks without a
result store); every read raises ``BackendNotConfigured`` with a message saying
how to configure one.

URL: ``None``, ``""`` or ``disabled://``.

Options: none.
"""

from __future__ import annotations

from typing import Any, ClassVar, NoReturn

from taskframe import states
from taskframe.backends.base import Backend, BackendOptions
from taskframe.errors import BackendNotConfigured, TaskRevokedError
from taskframe.protocol.results import ResultContext, ResultMeta, make_meta

__all__ = ["DisabledBackend"]

_HOW = (
    "no result backend is configured, so results cannot be read. Set the "
    "`result_backend` setting (for example app.conf.result_backend = "
    "'db+sqlite:///results.sqlite3' or 'db+postgresql://user@host/db', or "
    "Taskframe(..., backend=...), or the TASKFRAME_RESULT_BACKEND environment variable)"
)


class DisabledBackend(Backend):
    """Drops writes, refuses reads."""

    holds_revokes: ClassVar[bool] = False

    def __init__(self, url: str = "disabled://", options: BackendOptions | None = None) -> None:
        super().__init__(url, options)

    def _refuse(self, what: str) -> NoReturn:
        raise BackendNotConfigured(f"{what}: {_HOW}")

    def store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        *,
        traceback: str | None = None,
        context: ResultContext | None = None,
    ) -> ResultMeta:
        """Build and return the meta, storing nothing."""
        return make_meta(task_id, state, result, traceback=traceback, context=context,
                         extended=self.options.extended)

    def get_task_meta(self, task_id: str) -> ResultMeta:
        """Raises ``BackendNotConfigured``."""
        self._refuse(f"cannot get the state of task {task_id}")

    def wait_for(
        self, task_id: str, timeout: float | None = None, interval: float = 0.5
    ) -> ResultMeta:
        """Raises ``BackendNotConfigured``."""
        self._refuse(f"cannot wait for the result of task {task_id}")

    def mark_as_revoked(self, task_id: str, reason: str = "revoked", *,
                        context: ResultContext | None = None) -> ResultMeta:
        """Nothing is stored, so nothing to check: return the REVOKED meta."""
        return self.store_result(task_id, TaskRevokedError(reason), states.REVOKED,
                                 context=context)

    def forget(self, task_id: str) -> None:
        """Nothing stored, nothing to forget."""

    def save_group(self, group_id: str, result: Any) -> None:
        """Drop the group."""

    def restore_group(self, group_id: str) -> Any | None:
        """Raises ``BackendNotConfigured``."""
        self._refuse(f"cannot restore group {group_id}")

    def delete_group(self, group_id: str) -> None:
        """Nothing stored, nothing to delete."""

    def incr(self, key: str) -> int:
        """Raises ``BackendNotConfigured``: a counter needs a store."""
        self._refuse(f"cannot count chord parts ({key})")
