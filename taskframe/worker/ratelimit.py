"""Per-task rate limits (``rate_limit="10/s"``), per worker, as Celery's.

A token bucket per task name: ``capacity`` tokens refilled at ``rate`` per second.
The consumer asks ``RateLimits.delay(name)`` before starting a request; a
positive answer means "not before this many seconds", and the request waits in
the consumer's timer heap meanwhile (it keeps its place in the prefetch bound,
so nothing is lost or acked early).
"""

from __future__ import annotations

import time

from taskframe.errors import ImproperlyConfigured

__all__ = ["RateLimits", "TokenBucket", "parse_rate"]

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_rate(value: str | float | int | None) -> float:
    """Tasks per second for ``"10/s"``, ``"100/m"``, ``"1000/h"`` or a number (per second).

    ``None``, ``0`` or ``"0"`` mean no limit (0.0).

    Raises:
        ImproperlyConfigured: the string has another form.
    """
    if value is None:
        return 0.0
    if isinstance(value, int | float):
        return max(0.0, float(value))
    text = value.strip()
    count, _, unit = text.partition("/")
    try:
        number = float(count)
    except ValueError:
        raise ImproperlyConfigured(
            f"invalid rate limit {value!r}: use a number per second or 'N/s', 'N/m', 'N/h'"
        ) from None
    if not unit:
        return max(0.0, number)
    seconds = _UNITS.get(unit.strip()[:1].lower())
    if seconds is None:
        raise ImproperlyConfigured(
            f"invalid rate limit {value!r}: the unit is s, m or h"
        )
    return max(0.0, number / seconds)


class TokenBucket:
    """``rate`` tokens per second, at most ``capacity`` saved up (the burst)."""

    def __init__(self, rate: float, capacity: float = 1.0) -> None:
        self.rate = rate
        self.capacity = max(1.0, capacity)
        self._tokens = self.capacity
        self._stamp = time.monotonic()

    def _refill(self, now: float) -> None:
        self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def take(self, now: float | None = None) -> float:
        """Take one token; return 0.0 on success, else the seconds until one is there."""
        now = time.monotonic() if now is None else now
        self._refill(now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate


class RateLimits:
    """The buckets of one worker, by task name."""

    def __init__(self) -> None:
        self._buckets: dict[str, TokenBucket] = {}
        self._rates: dict[str, float] = {}

    def set(self, name: str, limit: str | float | int | None) -> None:
        """Set (or with None/0, remove) the limit of task ``name`` (control ``rate_limit``)."""
        rate = parse_rate(limit)
        self._buckets.pop(name, None)
        if rate > 0:
            self._rates[name] = rate
        else:
            self._rates[name] = 0.0

    def delay(self, name: str, default: str | float | int | None) -> float:
        """Seconds task ``name`` must wait before it may start (0.0: start now).

        ``default`` is the task's own ``rate_limit`` (or ``task_default_rate_limit``);
        a limit set at run time with ``set`` wins over it.
        """
        rate = self._rates.get(name)
        if rate is None:
            rate = self._rates[name] = parse_rate(default)
        if rate <= 0:
            return 0.0
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = self._buckets[name] = TokenBucket(rate)
        return bucket.take()
