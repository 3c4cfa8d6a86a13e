"""Calling Redis for the Redis result backend: the one edge where redis-py errors stop.

``run`` retries connection errors (``max_retries`` times, with backoff) and translates
every redis-py error that still escapes into ``taskframe.errors.BackendError``; the
pub/sub waiter (``redis_wait``) retries with the same errors and backoff.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
import redis.exceptions

from taskframe.errors import BackendError

__all__ = ["CONNECTION_ERRORS", "as_bytes", "backoff", "run"]

T = TypeVar("T")

#: Errors after which a call is retried: the connection, not the command, failed.
CONNECTION_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


def backoff(attempt: int) -> float:
    """Seconds to sleep before retry number ``attempt`` (from 0): 50 ms, x4, at most 2 s."""
    return min(0.05 * 4.0**attempt, 2.0)


def run(client: redis.Redis, max_retries: int, what: str, fn: Callable[[redis.Redis], T]) -> T:
    """Call ``fn(client)``; retry connection errors; translate every redis-py error.

    Raises:
        BackendError: Redis failed (``what`` says doing what), even after retries.
    """
    attempt = 0
    while True:
        try:
            return fn(client)
        except CONNECTION_ERRORS as exc:
            if attempt >= max_retries:
                raise BackendError(
                    f"{what} failed after {attempt + 1} attempts: "
                    f"{type(exc).__name__}: {exc}") from exc
            time.sleep(backoff(attempt))
            attempt += 1
        except redis.exceptions.RedisError as exc:
            raise BackendError(f"{what} failed: {type(exc).__name__}: {exc}") from exc


def as_bytes(value: Any) -> bytes | None:
    """A reply as bytes (``None`` stays ``None``)."""
    if value is None or isinstance(value, bytes):
        return value
    return str(value).encode() if isinstance(value, str) else bytes(value)
