"""Logging for workers: every line logged while a task runs carries its name and id.

``setup_logging`` installs one handler: on the root logger when
``worker_hijack_root_logger`` is true (Celery's default), otherwise on the
``taskframe`` logger only, leaving the root logger alone.
"""

from __future__ import annotations

import logging
import sys

from taskframe.context import current_request

__all__ = ["TaskFormatter", "get_task_logger", "setup_logging"]

_HANDLER_FLAG = "_taskframe_handler"


class TaskFormatter(logging.Formatter):
    """Uses the task format (with ``task_name`` and ``task_id``) while a task runs."""

    def __init__(self, fmt: str, task_fmt: str) -> None:
        super().__init__(fmt)
        self._task_formatter = logging.Formatter(task_fmt)

    def format(self, record: logging.LogRecord) -> str:
        if _is_internal(record.name):
            # taskframe's own lines already say "Task name[id] ...".
            return super().format(record)
        request = current_request()
        task_id = getattr(record, "task_id", None) or (request.id if request else None)
        if task_id:
            record.task_id = task_id
            if not getattr(record, "task_name", None):
                record.task_name = (request.shadow or request.task) if request else "?"
            return self._task_formatter.format(record)
        return super().format(record)


def _is_internal(name: str) -> bool:
    return name.startswith("taskframe.") and not name.startswith("taskframe.task.")


def setup_logging(
    loglevel: int | str = "INFO",
    *,
    hijack_root: bool = True,
    fmt: str = "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s",
    task_fmt: str = "[%(asctime)s: %(levelname)s/%(processName)s] "
    "%(task_name)s[%(task_id)s]: %(message)s",
    logfile: str | None = None,
) -> logging.Handler:
    """Install taskframe's handler and level; returns the handler. Idempotent."""
    level = logging.getLevelName(loglevel.upper()) if isinstance(loglevel, str) else loglevel
    target = logging.getLogger() if hijack_root else logging.getLogger("taskframe")
    for old in list(target.handlers):
        if getattr(old, _HANDLER_FLAG, False):
            target.removeHandler(old)
    handler: logging.Handler = (
        logging.FileHandler(logfile) if logfile else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(TaskFormatter(fmt, task_fmt))
    setattr(handler, _HANDLER_FLAG, True)
    target.addHandler(handler)
    target.setLevel(level)
    if not hijack_root:
        target.propagate = False
    return handler


def get_task_logger(name: str) -> logging.Logger:
    """The logger for task code: ``logger = get_task_logger(__name__)``."""
    return logging.getLogger(f"taskframe.task.{name}")
