"""Errors of the taskframe framework.

Every error raised by taskframe derives from ``TaskframeError``, except the
transport's, whose root ``TransportError`` lives in the stand-alone transport
package and is re-exported here.

Hierarchy::

    TaskframeError
    ├── ImproperlyConfigured          a setting or -A target is wrong
    ├── NotRegistered                 unknown task name
    ├── InvalidTaskError              a task message cannot be understood
    ├── PoolError                     a pool cannot do what was asked (resize solo)
    ├── ResultError
    │   ├── TimeoutError              a result was not ready in time
    │   ├── BackendNotConfigured      results asked for with no result_backend
    │   ├── IncompleteStream          collect() reached a result that is not ready
    │   └── BackendError              the result store failed (unreachable, refused)
    ├── TaskError                     raised inside or about one task
    │   ├── Retry                     control flow: the task asked to run again
    │   ├── Reject                    control flow: reject the message
    │   ├── Ignore                    control flow: store nothing, ack
    │   ├── MaxRetriesExceededError   retry() past max_retries
    │   ├── TaskRevokedError          the task was revoked or expired
    │   ├── WorkerLostError           the process running the task died
    │   │   └── DeliveryLimitExceeded its message was delivered too often unsettled
    │   └── ChordError                a chord header part failed
    ├── SoftTimeLimitExceeded         raised inside a task at its soft limit
    └── TimeLimitExceeded             the task hit its hard limit

    TransportError                    (taskframe.transport.errors)

Celery stores exceptions by module and class name; ``taskframe.protocol`` maps
Celery's names (``celery.exceptions.Retry``, ``billiard.exceptions.TimeLimitExceeded``)
to these classes, so results travel both ways.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from taskframe.transport.errors import (
    BrokerConnectionError,
    ConnectionLost,
    ContentDisallowed,
    DecodeError,
    EncodeError,
    PublishError,
    TransportError,
)

__all__ = [
    "BackendError",
    "BackendNotConfigured",
    "BrokerConnectionError",
    "ChordError",
    "ConnectionLost",
    "ContentDisallowed",
    "DecodeError",
    "DeliveryLimitExceeded",
    "EncodeError",
    "Ignore",
    "ImproperlyConfigured",
    "IncompleteStream",
    "InvalidTaskError",
    "MaxRetriesExceededError",
    "NotRegistered",
    "PoolError",
    "PublishError",
    "Reject",
    "ResultError",
    "Retry",
    "SoftTimeLimitExceeded",
    "TaskError",
    "TaskRevokedError",
    "TaskframeError",
    "TimeLimitExceeded",
    "TimeoutError",
    "TransportError",
    "WorkerLostError",
]


class TaskframeError(Exception):
    """Raised for any taskframe failure (root of the framework's errors)."""


class ImproperlyConfigured(TaskframeError):
    """Raised when a setting, a URL or an ``-A`` target is wrong."""


class NotRegistered(TaskframeError, KeyError):
    """Raised when a task name is not in the registry."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __repr__(self) -> str:
        return f"NotRegistered({self.args[0]!r})" if self.args else "NotRegistered()"


class InvalidTaskError(TaskframeError):
    """Raised when a task message is malformed (missing headers, bad body)."""


class PoolError(TaskframeError):
    """Raised when a worker pool cannot do what was asked (e.g. resize the solo pool)."""


class ResultError(TaskframeError):
    """Raised for failures of the results API."""


class TimeoutError(ResultError):
    """Raised when a result is not ready within the given timeout."""


class BackendNotConfigured(ResultError):
    """Raised when a result is asked for but no ``result_backend`` is configured."""


class IncompleteStream(ResultError):
    """Raised by ``iterdeps()`` when it reaches a result that is not ready yet."""


class BackendError(ResultError):
    """Raised when the result store cannot be reached or fails an operation."""


class TaskError(TaskframeError):
    """Raised inside or about one task."""


class Retry(TaskError):
    """Raised by ``Task.retry()``: the task will run again.

    Attributes:
        message: why, for logs.
        exc: the exception that caused the retry, if any.
        when: the countdown (seconds) or ETA of the next run.
    """

    def __init__(
        self,
        message: str | None = None,
        exc: BaseException | None = None,
        when: float | datetime | None = None,
        is_eager: bool = False,
        sig: Any = None,
    ) -> None:
        self.message = message
        self.exc = exc
        self.when = when
        self.is_eager = is_eager
        self.sig = sig
        super().__init__(message, exc, when)

    def humanize(self) -> str:
        """``in 3.0s`` or ``at <eta>``, for log lines."""
        if isinstance(self.when, int | float):
            return f"in {self.when}s"
        return f"at {self.when}"

    def __str__(self) -> str:
        if self.message:
            return self.message
        if self.exc is not None:
            return f"Retry {self.humanize()}: {self.exc!r}"
        return f"Retry {self.humanize()}"

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.message, self.exc, self.when)


class Reject(TaskError):
    """Raised by a task to reject its message, requeued when ``requeue`` is true."""

    def __init__(self, reason: Any = None, requeue: bool = False) -> None:
        self.reason = reason
        self.requeue = requeue
        super().__init__(reason, requeue)


class Ignore(TaskError):
    """Raised by a task to end without storing any state; the message is acked."""


class MaxRetriesExceededError(TaskError):
    """Raised when ``retry()`` is called after ``max_retries`` retries."""


class TaskRevokedError(TaskError):
    """Raised (and stored) when a task was revoked, expired or terminated."""


class WorkerLostError(TaskError):
    """Raised (and stored) when the process running a task died."""


class DeliveryLimitExceeded(WorkerLostError):
    """Stored (FAILURE) when a task's message was delivered ``worker_delivery_limit`` times
    without being settled: each run lost the process running it (a prefork child, or the
    worker itself), so the worker does not run it again and dead-letters the message.
    """


class ChordError(TaskError):
    """Raised (and stored on the body) when a chord header task failed."""


class SoftTimeLimitExceeded(TaskframeError):
    """Raised inside a running task when its soft time limit is reached."""

    def __str__(self) -> str:
        return f"SoftTimeLimitExceeded{self.args}"  # billiard's text


class TimeLimitExceeded(TaskframeError):
    """Raised (and stored) when a task hit its hard time limit and was stopped.

    ``args`` is ``(limit_seconds,)``, as billiard stores it.
    """

    def __str__(self) -> str:
        return f"TimeLimitExceeded{self.args}"  # billiard's text: TimeLimitExceeded(5.0,)
