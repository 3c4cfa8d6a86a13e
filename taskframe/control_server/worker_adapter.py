"""``WorkerControlState``: the worker seen through the ``WorkerState`` protocol.

It reads the consumer's ``active``/``reserved``/``timers``/``totals`` (copies
taken under the GIL: the loop and pool threads keep changing them) and the
pool's jobs (start time, pid), and hands anything
that touches the consuming connection (``add_consumer``, ``cancel_consumer``,
pool resizing) to the consumer loop through ``consumer.call_soon`` when the
consumer has it.

``load_revoked(app, statedb)`` builds the worker's revoked set at start from the
``--statedb`` file and the shared store; ``RemoteControl`` keeps it caught up with the
store afterwards (``RevokeSync``).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

from taskframe.control.mailbox import LamportClock
from taskframe.control.revoked import RevokedSet, RevokeStore, StateDB, mark_revoked, store_for
from taskframe.control_server.contract import RequestView
from taskframe.control_server.revoke_sync import RevokeSync
from taskframe.errors import PoolError

if TYPE_CHECKING:
    from taskframe.client.app import Taskframe
    from taskframe.transport import Queue
    from taskframe.worker.consumer import Consumer
    from taskframe.worker.request import Request

__all__ = ["RemoteControl", "WorkerControlState", "load_revoked"]

logger = logging.getLogger("taskframe.control.worker_state")

# Seconds a command waits for the consumer loop to carry out a change it needs an answer to.
_LOOP_WAIT = 2.0


def load_revoked(app: Taskframe, statedb: str | None = None
                 ) -> tuple[RevokedSet, StateDB | None, RevokeStore | None]:
    """The worker's revoked set, filled from ``statedb`` and the shared store."""
    conf = app.conf
    revoked = RevokedSet(int(conf.worker_revoked_max or 0),
                         float(conf.worker_revoked_expires or 10800.0))
    db = StateDB(statedb) if statedb else None
    if db is not None:
        revoked.update(db.load())
    store = store_for(app)
    if store is not None:
        try:
            revoked.update(store.load())
        except Exception as exc:
            logger.warning("could not load revoked ids from the result backend: %r", exc)
    if len(revoked):
        logger.info("%d revoked task id(s) loaded", len(revoked))
    return revoked, db, store


class WorkerControlState:
    """Implements ``WorkerState`` for a running ``Worker``.

    Args:
        worker: the ``Worker`` (``stop()``, ``pool_name``).
        consumer: its ``Consumer``.
        revoked / statedb / store: from ``load_revoked``.
        events: the worker's ``WorkerEvents`` (or ``None``).
        health: the worker's ``Watchdog.status`` (or ``None``: not watched).
    """

    def __init__(self, worker: Any, consumer: Consumer, *, revoked: RevokedSet,
                 statedb: StateDB | None = None, store: RevokeStore | None = None,
                 events: Any = None, clock: LamportClock | None = None,
                 health: Callable[[], dict[str, Any]] | None = None) -> None:
        self.worker = worker
        self._health = health
        self.consumer = consumer
        self._revoked = revoked
        self.statedb = statedb
        self.store = store
        self.events = events
        self._clock = clock or LamportClock()
        self._started_at = time.time()

    def close(self) -> None:
        """Release what the state holds (nothing now; kept for the worker's stop order)."""

    # -- WorkerState properties ---------------------------------------------------------

    @property
    def hostname(self) -> str:
        return str(self.consumer.hostname)

    @property
    def app(self) -> Taskframe:
        app: Taskframe = self.consumer.app
        return app

    @property
    def revoked(self) -> RevokedSet:
        return self._revoked

    @property
    def clock(self) -> LamportClock:
        return self._clock

    @property
    def started_at(self) -> float:
        return self._started_at

    @property
    def prefetch_count(self) -> int:
        return int(self.consumer.prefetch_count or 0)

    # -- reading ------------------------------------------------------------------------

    def _view(self, request: Request, *, eta: float | None = None) -> RequestView:
        ctx = request.context
        job, started = request.job, request.started
        time_start = job.time_start if job is not None else None
        pid = job.pid if job is not None else None
        message = request.message
        return RequestView(
            id=request.id, name=request.name, type=request.task.name,
            args=list(ctx.args), kwargs=dict(ctx.kwargs), hostname=self.hostname,
            time_start=time_start if started else None,
            acknowledged=message.state == "ACKED",
            worker_pid=pid or (os.getpid() if started else None),
            delivery_info=dict(message.delivery_info), eta=eta,
            priority=ctx.priority, stamps=dict(ctx.stamps or {}),
        )

    def active(self) -> list[RequestView]:
        # Started runs only: a pool may hold a submitted job until a slot takes it (prefork
        # queues one per child ahead); until then it is reserved, as in Celery.
        return [self._view(r) for r in list(self.consumer.active.values()) if r.started]

    def reserved(self) -> list[RequestView]:
        waiting = [r for r in list(self.consumer.active.values()) if not r.started]
        waiting += list(self.consumer.reserved)
        waiting += [entry[-1] for entry in sorted(list(self.consumer.limited),
                                                  key=lambda e: e[0])]
        return [self._view(r) for r in waiting]

    def scheduled(self) -> list[RequestView]:
        now_mono, now = time.monotonic(), time.time()
        return [self._view(entry[-1], eta=now + (entry[0] - now_mono))
                for entry in sorted(list(self.consumer.timers), key=lambda e: e[0])]

    def totals(self) -> dict[str, int]:
        return self.consumer.total_counts()

    def pool_stats(self) -> dict[str, Any]:
        pool = self.consumer.pool
        stats = dict(pool.stats())  # implementation, max-concurrency, processes, ...
        app = self.app
        stats["max-concurrency"] = pool.concurrency
        stats.setdefault("max-tasks-per-child", app.conf.worker_max_tasks_per_child)
        stats.setdefault("put-guarded-by-semaphore", False)
        stats.setdefault("timeouts", [app.conf.task_soft_time_limit or 0,
                                      app.conf.task_time_limit or 0])
        return stats

    def queues(self) -> list[Queue]:
        return list(self.consumer.queues)

    def health(self) -> dict[str, Any]:
        if self._health is None:
            return {"status": "unknown", "stall": None}
        return self._health()

    # -- changing -----------------------------------------------------------------------

    def _on_loop(self, fn: Callable[[], None]) -> None:
        self.consumer.call_soon(fn)

    def add_consumer(self, queue: Queue) -> None:
        def add() -> None:
            consumer = self.consumer
            if any(q.name == queue.name for q in consumer.queues):
                return
            consumer.queues.append(queue)
            transport = consumer.connection.transport
            transport.declare(queue)
            transport.consume([queue], prefetch_count=consumer.prefetch_count)
            logger.info("remote control: consuming from %s", queue.name)
        self._on_loop(add)

    def cancel_consumer(self, name: str) -> None:
        def cancel() -> None:
            consumer = self.consumer
            consumer.queues[:] = [q for q in consumer.queues if q.name != name]
            consumer.connection.transport.cancel(name)
            logger.info("remote control: no longer consuming from %s", name)
        self._on_loop(cancel)

    def set_rate_limit(self, task_name: str, limit: str | None) -> None:
        consumer = self.consumer
        self._on_loop(lambda: consumer.set_rate_limit(task_name, limit))

    def resize_pool(self, delta: int) -> bool:
        pool = self.consumer.pool
        fn = pool.grow if delta > 0 else pool.shrink
        done: concurrent.futures.Future[bool] = concurrent.futures.Future()

        def resize() -> None:
            try:
                fn(abs(delta))
                done.set_result(True)
            except PoolError:
                done.set_result(False)

        self._on_loop(resize)
        try:
            return done.result(timeout=_LOOP_WAIT)
        except concurrent.futures.TimeoutError:
            return True  # queued: the loop is busy, it resizes at its next turn

    def terminate(self, task_ids: Collection[str], signum: int) -> list[str]:
        found = []
        pool = self.consumer.pool
        for task_id in task_ids:
            request = self.consumer.active.get(task_id)
            if request is None:
                continue
            found.append(task_id)
            if request.job is not None:
                # Threads and solo cannot be killed: their terminate is should_abort().
                pool.terminate(request.job, signum)
            else:
                request.context.request_abort("revoked")
        return found

    def persist_revokes(self, task_ids: Collection[str]) -> None:
        if self.statedb is not None:
            try:
                self.statedb.save(self._revoked, self._clock.value)
            except OSError as exc:
                logger.warning("could not write the state db: %s", exc)
        if self.store is not None and task_ids:
            try:
                self.store.add(task_ids, self._revoked.expires)
            except Exception as exc:
                logger.warning("could not record revoked ids in the result backend: %r", exc)

    def mark_learned(self, task_ids: Collection[str]) -> None:
        """Store REVOKED for ids learned from the shared store that do not run here."""
        running = {r.id for r in self.active()}
        mark_revoked(self.app.backend, sorted(set(task_ids) - running))

    def shutdown(self) -> None:
        self.worker.stop()

    def set_events(self, enabled: bool) -> bool:
        events = self.events
        if events is None:
            return False
        if enabled:
            return not bool(events.enable_task_events())
        return bool(events.disable_task_events())

    def send_heartbeat(self) -> None:
        if self.events is not None:
            self.events.heartbeat()


class RemoteControl:
    """What a ``Worker`` starts for remote control, in one object: state, node, revoke sync.

    ``RemoteControl.start(worker, consumer, revoked=..., ...)`` answers commands from a
    thread of its own (when ``worker_enable_remote_control`` is on and the broker has
    fanout exchanges) and, with a shared revoke store, catches up on the revokes the
    node did not hear (after the node reconnects and every
    ``worker_revoked_sync_interval`` seconds); ``stop()`` ends them and saves the
    ``--statedb`` file.
    """

    def __init__(self, state: WorkerControlState, node: Any,
                 sync: RevokeSync | None = None) -> None:
        self.state = state
        self.node = node
        self.sync = sync

    @classmethod
    def start(cls, worker: Any, consumer: Consumer, *, revoked: RevokedSet,
              statedb: StateDB | None = None, store: RevokeStore | None = None,
              events: Any = None,
              health: Callable[[], dict[str, Any]] | None = None) -> RemoteControl:
        """Build the state and, unless remote control is off, start the node."""
        from taskframe.control_server.node import ControlNode

        state = WorkerControlState(worker, consumer, revoked=revoked, statedb=statedb,
                                   store=store, events=events, health=health)
        sync = None
        if store is not None:
            sync = RevokeSync(revoked, store,
                              float(consumer.app.conf.worker_revoked_sync_interval or 0),
                              on_learned=state.mark_learned)
            sync.start()
        node = None
        if consumer.app.conf.worker_enable_remote_control:
            node = ControlNode(consumer.app, state,
                               on_reconnect=sync.wake if sync is not None else None)
            try:
                if not node.start():
                    node = None
            except Exception as exc:
                logger.error("remote control not started: %s", exc)
                node = None
        return cls(state, node, sync)

    def stop(self) -> None:
        """Stop answering; save the revoked set to the ``--statedb`` file."""
        if self.node is not None:
            self.node.stop()
        if self.sync is not None:
            self.sync.stop()
        self.state.close()
        if self.state.statedb is not None:
            try:
                self.state.statedb.save(self.state.revoked, self.state.clock.value)
            except OSError as exc:
                logger.warning("could not write the state db: %s", exc)
