"""The public API is pinned: adding or removing a name is a deliberate change."""

from __future__ import annotations

import subprocess
import sys

import taskframe

EXPECTED = [
    "AsyncResult", "Celery", "Context", "EagerResult", "GroupResult", "Ignore",
    "MaxRetriesExceededError", "NotRegistered", "Reject", "ResultSet", "Retry", "Signature",
    "SoftTimeLimitExceeded", "Task", "TaskRevokedError", "Taskframe", "TaskframeError",
    "TimeLimitExceeded", "Worker", "WorkerLostError", "__version__", "chain", "chord", "chunks",
    "current_app", "get_task_logger", "group", "shared_task", "signature", "xmap", "xstarmap",
]


def test_all_is_pinned_and_sorted() -> None:
    assert taskframe.__all__ == sorted(EXPECTED)


def test_every_public_name_resolves() -> None:
    for name in taskframe.__all__:
        assert getattr(taskframe, name) is not None


def test_celery_is_an_alias() -> None:
    assert taskframe.Celery is taskframe.Taskframe


def test_importing_transport_does_not_import_the_app() -> None:
    code = ("import sys, taskframe.transport; "
            "print('taskframe.client.app' in sys.modules, 'taskframe.worker' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
