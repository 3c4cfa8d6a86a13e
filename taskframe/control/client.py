"""``app.control``: send remote-control commands and collect replies (Celery's API).

::

    app.control.ping(timeout=1.0)                        # [{"w1@host": {"ok": "pong"}}]
    app.control.inspect(destination=["w1@host"]).active()  # {"w1@host": [...]}
    app.control.revoke(task_id, terminate=True, signal="SIGKILL")

``revoke`` also records the ids in the shared revoke store (the result
backend), so workers that start later, or that did not hear the broadcast, skip
those tasks too.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from taskframe.control.mailbox import DEFAULT_TIMEOUT, LamportClock, Mailbox, Reply, mailbox_for
from taskframe.control.revoked import revoked_ids, store_for

if TYPE_CHECKING:
    from taskframe.client.app import Taskframe
    from taskframe.transport import Connection

__all__ = ["Control", "Inspect", "flatten_replies"]

logger = logging.getLogger("taskframe.control.client")


def flatten_replies(replies: Sequence[Reply]) -> dict[str, Any]:
    """``[{node: value}, ...]`` as ``{node: value}``."""
    out: dict[str, Any] = {}
    for reply in replies:
        out.update(reply)
    return out


class Inspect:
    """Inspect commands for the nodes addressed; each returns ``{node: reply}`` or ``None``.

    Args:
        control: the app's ``Control``.
        destination: node names (``None``: every node).
        timeout: seconds to wait for replies.
    """

    def __init__(self, control: Control, *, destination: Sequence[str] | str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, callback: Callable[[Reply], None] | None = None,
                 connection: Connection | None = None, limit: int | None = None,
                 pattern: str | None = None, matcher: str | None = None) -> None:
        self.control = control
        self.destination = [destination] if isinstance(destination, str) else destination
        self.timeout = timeout
        self.callback = callback
        self.connection = connection
        self.limit = limit
        self.pattern = pattern
        self.matcher = matcher

    def _request(self, method: str, **arguments: Any) -> dict[str, Any] | None:
        replies = self.control.broadcast(
            method, arguments, destination=self.destination, reply=True, timeout=self.timeout,
            callback=self.callback, connection=self.connection, limit=self.limit,
            pattern=self.pattern, matcher=self.matcher,
        )
        return flatten_replies(replies) or None

    def ping(self) -> dict[str, Any] | None:
        """``{node: {"ok": "pong"}}``."""
        return self._request("ping")

    def active(self, safe: bool | None = None) -> dict[str, Any] | None:
        """Running requests per node."""
        return self._request("active", safe=safe)

    def reserved(self) -> dict[str, Any] | None:
        """Received requests waiting for a slot, per node."""
        return self._request("reserved")

    def scheduled(self) -> dict[str, Any] | None:
        """Requests held until their ETA, per node."""
        return self._request("scheduled")

    def revoked(self) -> dict[str, Any] | None:
        """Revoked ids per node."""
        return self._request("revoked")

    def registered(self, *taskinfoitems: str) -> dict[str, Any] | None:
        """Registered task names per node."""
        return self._request("registered", taskinfoitems=list(taskinfoitems))

    registered_tasks = registered

    def stats(self) -> dict[str, Any] | None:
        """Statistics per node."""
        return self._request("stats")

    def active_queues(self) -> dict[str, Any] | None:
        """Consumed queues per node."""
        return self._request("active_queues")

    def conf(self, with_defaults: bool = False) -> dict[str, Any] | None:
        """Settings per node."""
        return self._request("conf", with_defaults=with_defaults)

    def query_task(self, *ids: str) -> dict[str, Any] | None:
        """``{node: {task_id: [state, info]}}`` for the ids a node holds."""
        flat: list[str] = []
        for i in ids:
            flat.extend(revoked_ids(i))
        return self._request("query_task", ids=flat)

    def clock(self) -> dict[str, Any] | None:
        """Logical clock per node."""
        return self._request("clock")

    def report(self) -> dict[str, Any] | None:
        """Bug-report text per node."""
        return self._request("report")

    def hello(self, from_node: str, revoked: Sequence[str] | None = None
              ) -> dict[str, Any] | None:
        """Celery's mingle exchange: send our revoked ids, get theirs."""
        return self._request("hello", from_node=from_node, revoked=list(revoked or []))


class Control:
    """The remote-control client of one app (``app.control``)."""

    def __init__(self, app: Taskframe) -> None:
        self.app = app
        self.clock = LamportClock()
        self._local = threading.local()
        self._mailbox: Mailbox | None = None

    @property
    def mailbox(self) -> Mailbox:
        """The pidbox exchanges the app's settings name."""
        if self._mailbox is None:
            self._mailbox = mailbox_for(self.app, self.clock)
        return self._mailbox

    @property
    def oid(self) -> str:
        """This thread's reply routing key (one reply queue per client thread)."""
        oid: str | None = getattr(self._local, "oid", None)
        if oid is None:
            oid = self._local.oid = str(uuid.uuid4())
        return oid

    def inspect(self, destination: Sequence[str] | str | None = None,
                timeout: float = DEFAULT_TIMEOUT, **options: Any) -> Inspect:
        """An ``Inspect`` for these nodes."""
        return Inspect(self, destination=destination, timeout=timeout, **options)

    def broadcast(self, command: str, arguments: Mapping[str, Any] | None = None,
                  destination: Sequence[str] | None = None, connection: Connection | None = None,
                  reply: bool = False, timeout: float = DEFAULT_TIMEOUT, limit: int | None = None,
                  callback: Callable[[Reply], None] | None = None, pattern: str | None = None,
                  matcher: str | None = None, **extra: Any) -> list[Reply]:
        """Send ``command`` to the nodes; with ``reply``, return ``[{node: value}, ...]``.

        Raises:
            BrokerConnectionError: the broker cannot be reached.
        """
        arguments = {**dict(arguments or {}), **extra}
        own = connection is None
        conn = connection or self.app.connection()
        try:
            return self.mailbox.broadcast(
                conn, command, arguments, destination=destination, pattern=pattern,
                matcher=matcher, reply=reply, timeout=timeout, limit=limit,
                oid=self.oid, callback=callback,
            )
        finally:
            if own:
                conn.close()

    def ping(self, destination: Sequence[str] | None = None, timeout: float = DEFAULT_TIMEOUT,
             **options: Any) -> list[Reply]:
        """``[{node: {"ok": "pong"}}, ...]``."""
        return self.broadcast("ping", reply=True, destination=destination, timeout=timeout,
                              **options)

    def revoke(self, task_id: str | Sequence[str], destination: Sequence[str] | None = None,
               terminate: bool = False, signal: str = "SIGTERM", **options: Any) -> list[Reply]:
        """Revoke tasks everywhere: running workers now, workers started later too."""
        ids = revoked_ids(task_id)
        self.remember_revoked(ids)
        return self.broadcast("revoke", destination=destination,
                              arguments={"task_id": ids, "terminate": terminate,
                                         "signal": signal}, **options)

    def remember_revoked(self, task_ids: Sequence[str]) -> None:
        """Record ids in the shared revoke store (logged, not raised, on failure).

        The client does not store REVOKED as the tasks' state: it cannot tell a task
        running somewhere from one not started. Workers do, for the tasks they do not
        run, when they hear the revoke or catch up on it.
        """
        store = store_for(self.app)
        if store is None:
            return
        try:
            store.add(task_ids, float(self.app.conf.worker_revoked_expires))
        except Exception as exc:
            logger.warning("could not record revoked ids in the result backend: %r", exc)

    def terminate(self, task_id: str | Sequence[str], destination: Sequence[str] | None = None,
                  signal: str = "SIGTERM", **options: Any) -> list[Reply]:
        """Revoke and terminate running tasks."""
        return self.revoke(task_id, destination=destination, terminate=True, signal=signal,
                           **options)

    def revoke_by_stamped_headers(self, headers: Mapping[str, Any],
                                  destination: Sequence[str] | None = None,
                                  terminate: bool = False, signal: str = "SIGTERM",
                                  **options: Any) -> list[Reply]:
        """Revoke every task stamped with one of ``headers``."""
        return self.broadcast("revoke_by_stamped_headers", destination=destination,
                              arguments={"headers": dict(headers), "terminate": terminate,
                                         "signal": signal}, **options)

    def rate_limit(self, task_name: str, rate_limit: str | int | None,
                   destination: Sequence[str] | None = None, **options: Any) -> list[Reply]:
        """Set a task's rate limit on the workers."""
        return self.broadcast("rate_limit", destination=destination,
                              arguments={"task_name": task_name, "rate_limit": rate_limit},
                              **options)

    def time_limit(self, task_name: str, soft: float | None = None, hard: float | None = None,
                   destination: Sequence[str] | None = None, **options: Any) -> list[Reply]:
        """Set a task's time limits on the workers."""
        return self.broadcast("time_limit", destination=destination,
                              arguments={"task_name": task_name, "soft": soft, "hard": hard},
                              **options)

    def add_consumer(self, queue: str, exchange: str | None = None,
                     exchange_type: str = "direct", routing_key: str | None = None,
                     options: Mapping[str, Any] | None = None,
                     destination: Sequence[str] | None = None, **kwargs: Any) -> list[Reply]:
        """Ask workers to consume ``queue``."""
        return self.broadcast("add_consumer", destination=destination, arguments={
            "queue": queue, "exchange": exchange, "exchange_type": exchange_type,
            "routing_key": routing_key, **dict(options or {})}, **kwargs)

    def cancel_consumer(self, queue: str, destination: Sequence[str] | None = None,
                        **kwargs: Any) -> list[Reply]:
        """Ask workers to stop consuming ``queue``."""
        return self.broadcast("cancel_consumer", destination=destination,
                              arguments={"queue": queue}, **kwargs)

    def pool_grow(self, n: int = 1, destination: Sequence[str] | None = None,
                  **kwargs: Any) -> list[Reply]:
        """Add pool slots."""
        return self.broadcast("pool_grow", destination=destination, arguments={"n": n},
                              **kwargs)

    def pool_shrink(self, n: int = 1, destination: Sequence[str] | None = None,
                    **kwargs: Any) -> list[Reply]:
        """Remove pool slots."""
        return self.broadcast("pool_shrink", destination=destination, arguments={"n": n},
                              **kwargs)

    def shutdown(self, destination: Sequence[str] | None = None, **kwargs: Any) -> list[Reply]:
        """Warm-shut-down workers (they send no reply)."""
        return self.broadcast("shutdown", destination=destination, **kwargs)

    def enable_events(self, destination: Sequence[str] | None = None,
                      **kwargs: Any) -> list[Reply]:
        """Turn task events on."""
        return self.broadcast("enable_events", destination=destination, **kwargs)

    def disable_events(self, destination: Sequence[str] | None = None,
                       **kwargs: Any) -> list[Reply]:
        """Turn task events off."""
        return self.broadcast("disable_events", destination=destination, **kwargs)

    def heartbeat(self, destination: Sequence[str] | None = None,
                  **kwargs: Any) -> list[Reply]:
        """Ask workers for a heartbeat event."""
        return self.broadcast("heartbeat", destination=destination, **kwargs)
