"""What remote-control handlers need from a worker: the ``WorkerState`` protocol.

The worker implements it (``taskframe.control.worker_state``); the handlers in
``panel`` only ever see this protocol, so they are tested without a broker.
Methods are called from the control node's thread: an implementation hands
anything that touches the consuming connection to the consumer loop.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from taskframe.client.app import Taskframe
    from taskframe.control.mailbox import LamportClock
    from taskframe.control.revoked import RevokedSet
    from taskframe.transport import Queue

__all__ = ["RequestView", "WorkerState"]


@dataclass
class RequestView:
    """One request as inspect replies describe it (Celery's request info).

    Attributes:
        eta: unix time the request is due (scheduled ones), else ``None``.
        time_start: unix time it started running, else ``None``.
    """

    id: str
    name: str
    type: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    hostname: str = ""
    time_start: float | None = None
    acknowledged: bool = False
    worker_pid: int | None = None
    delivery_info: dict[str, Any] = field(default_factory=dict)
    eta: float | None = None
    priority: int | None = None
    stamps: dict[str, Any] = field(default_factory=dict)

    def info(self, safe: bool | None = False) -> dict[str, Any]:
        """The reply shape (``safe``: args and kwargs as their repr strings, as Flower asks)."""
        info = self.delivery_info
        return {
            "id": self.id,
            "name": self.name,
            "args": repr(self.args) if safe else self.args,
            "kwargs": repr(self.kwargs) if safe else self.kwargs,
            "type": self.type,
            "hostname": self.hostname,
            "time_start": self.time_start,
            "acknowledged": self.acknowledged,
            "worker_pid": self.worker_pid,
            "delivery_info": {
                "exchange": info.get("exchange", ""),
                "routing_key": info.get("routing_key", ""),
                "priority": info.get("priority", 0),
                "redelivered": bool(info.get("redelivered", False)),
            },
        }


class WorkerState(Protocol):
    """The worker as remote control sees it.

    Attributes:
        hostname: the node name (``name@host``).
        app: the worker's app (tasks, settings, backend).
        revoked: the worker's revoked set.
        clock: the logical clock shared with the mailbox.
        started_at: unix time the worker started.
        prefetch_count: the current prefetch bound (0: none).
    """

    @property
    def hostname(self) -> str: ...

    @property
    def app(self) -> Taskframe: ...

    @property
    def revoked(self) -> RevokedSet: ...

    @property
    def clock(self) -> LamportClock: ...

    @property
    def started_at(self) -> float: ...

    @property
    def prefetch_count(self) -> int: ...

    def active(self) -> list[RequestView]:
        """Requests running now."""

    def reserved(self) -> list[RequestView]:
        """Requests received and waiting for a pool slot (not running, not scheduled)."""

    def scheduled(self) -> list[RequestView]:
        """Requests held until their ETA (``eta`` set)."""

    def totals(self) -> dict[str, int]:
        """How many tasks of each name this worker has run."""

    def pool_stats(self) -> dict[str, Any]:
        """``stats['pool']``: ``implementation``, ``max-concurrency``, ``processes``, ..."""

    def queues(self) -> list[Queue]:
        """The task queues consumed now."""

    def health(self) -> dict[str, Any]:
        """``stats['health']``: ``status`` (``"ok"``, ``"stalled"``) and ``stall`` (why, or
        ``None``), as the worker's watchdog last saw them."""

    def add_consumer(self, queue: Queue) -> None:
        """Start consuming ``queue`` (asynchronously; returns at once)."""

    def cancel_consumer(self, name: str) -> None:
        """Stop consuming queue ``name`` (asynchronously)."""

    def set_rate_limit(self, task_name: str, limit: str | None) -> None:
        """Apply a task's new rate limit (``None``: none) to runs waiting here."""

    def resize_pool(self, delta: int) -> bool:
        """Grow (``delta > 0``) or shrink the pool; False when the pool cannot."""

    def terminate(self, task_ids: Collection[str], signum: int) -> list[str]:
        """Stop these tasks if they run here; return the ids that were running.

        Pools that cannot kill a job ask it to stop: ``request.should_abort()``
        turns true with ``abort_reason == "revoked"``.
        """

    def persist_revokes(self, task_ids: Collection[str]) -> None:
        """Write newly revoked ids to the ``--statedb`` file and the shared store.

        Failures are logged, never raised: the in-memory set already has them.
        """

    def shutdown(self) -> None:
        """Begin a warm shutdown."""

    def set_events(self, enabled: bool) -> bool:
        """Turn task events on or off; return whether they were on before."""

    def send_heartbeat(self) -> None:
        """Send a ``worker-heartbeat`` event now (a no-op without events)."""
