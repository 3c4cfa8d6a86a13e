"""RPC result backend (``rpc://``): results travel as broker messages, as Celery's ``rpc``.

Features (../shared/spec/celery-wire.md §6.6):

* Nothing is stored. A worker publishes each state (STARTED, RETRY, SUCCESS,
  FAILURE, REVOKED) of a task as one message to the default exchange ``""``
  with routing key = the task message's ``reply_to`` and ``correlation_id`` =
  the request's correlation id (the task id), body = the result meta (§6.1, with
  ``task_id``) in ``result_serializer``; ``delivery_mode`` 1, or 2 with
  ``result_persistent``. A task sent without ``reply_to`` gets no reply.
* The sending process reads its replies from one queue named after its
  ``reply_to`` (the app's ``origin``): durable, auto-delete, ``x-expires`` =
  ``result_expires``, declared before the first task is sent (the app calls
  ``on_task_call``), consumed by one consumer shared by the process's threads.
  Replies are buffered by task id (the latest state wins, a ready state is never
  replaced by a later unready one); ``forget`` drops a task's buffered state.
  Only the client that sent a task can read its result, and only in the
  process (and app) that sent it.
* ``wait_for`` waits on the reply queue (pushed, no sleeping between polls).
* A Celery client with ``rpc://`` reads the replies of a taskframe worker and
  the reverse: same exchange, routing key, correlation id and body.
* Groups, counters (chords) and ``cleanup`` are not supported (as in Celery):
  ``save_group``/``restore_group``/``delete_group``/``incr`` raise
  ``ImproperlyConfigured``.

Works on any broker transport whose default exchange routes by queue name:
AMQP (RabbitMQ) and Redis. A reply to a queue that no longer exists (its client
is gone) is dropped with a warning.

URL: ``rpc://`` (anything after the scheme is ignored: the broker is the app's).

Options (``BackendOptions``): ``connection`` (a factory of broker connections:
the app's ``connection``; required), ``reply_to`` (the queue name; a new uuid
when unset), ``persistent`` (``result_persistent``), ``expires`` (the queue's
``x-expires``), ``serializer``, ``accept``, ``extended``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, ClassVar, NoReturn

from taskframe import states
from taskframe.backends._codec import ResultCodec
from taskframe.backends.base import Backend, BackendOptions
from taskframe.errors import BackendError, ImproperlyConfigured
from taskframe.errors import TimeoutError as ResultTimeout
from taskframe.protocol.results import ResultContext, ResultMeta, make_meta
from taskframe.transport import errors as transport_errors
from taskframe.transport.base import Envelope, Message
from taskframe.transport.connection import Connection, Consumer
from taskframe.transport.entities import Exchange, Queue
from taskframe.transport.producer import Producer

__all__ = ["RPCBackend"]

logger = logging.getLogger("taskframe.backends.rpc")

#: Celery's rpc publish retry policy: up to 20 re-runs, at most a second apart.
RETRY_POLICY: dict[str, Any] = {"max_retries": 20, "interval_start": 0.0,
                                "interval_step": 1.0, "interval_max": 1.0}
#: Longest single wait on the reply queue while holding the consumer (other
#: threads of the process take turns reading the shared queue).
POLL_SLICE = 0.25
#: Replies kept for tasks nobody asked about yet; the oldest go first past this.
MAX_BUFFERED = 10_000
#: Reconnection attempts of the reply consumer before ``BackendError``.
MAX_RECONNECTS = 5


class RPCBackend(Backend):
    """Results as messages on the broker, to the sender's reply queue."""

    schemes: ClassVar[tuple[str, ...]] = ("rpc",)
    supports_push: ClassVar[bool] = True
    holds_revokes: ClassVar[bool] = False  # nothing is stored: revokes are not shared

    def __init__(self, url: str, options: BackendOptions | None = None) -> None:
        super().__init__(url, options)
        self._codec = ResultCodec(self.options.serializer, self.options.accept,
                                  self.options.max_message_size)
        self.reply_to = self.options.reply_to or str(uuid.uuid4())
        self.delivery_mode = 2 if self.options.persistent else 1
        self._new_locks()
        self._publishers: list[Connection] = []  # every one made (closed by close())
        self._idle: list[Connection] = []  # those not publishing right now
        self._consumer: Consumer | None = None
        self._metas: OrderedDict[str, ResultMeta] = OrderedDict()
        self._pid = os.getpid()

    def _new_locks(self) -> None:
        # Three locks, so an in-process worker publishing replies never waits
        # behind a client thread that is reading the reply queue:
        #   _lock: the publishing connections (held for a list operation);
        #   _changed: the buffered replies; notified when replies arrive;
        #   _reading: the reply consumer (held while one thread reads the queue).
        self._lock = threading.Lock()
        self._changed = threading.Condition()
        self._reading = threading.Lock()

    # -- connections ----------------------------------------------------------------------

    def _connection(self) -> Connection:
        factory = self.options.connection
        if factory is None:
            raise ImproperlyConfigured(
                "the rpc:// result backend sends results through the broker: it needs the "
                "app's broker connection (use it through an app, or pass "
                "BackendOptions(connection=...))")
        return factory()

    def _check_fork(self) -> None:
        if self._pid != os.getpid():
            # The parent's sockets are never used or closed here (a close frame
            # would end the parent's connection too); its locks may be held by
            # threads that do not exist here.
            self._new_locks()
            self._publishers = []
            self._idle = []
            self._consumer = None
            self._metas = OrderedDict()
            self._pid = os.getpid()

    def reply_queue(self) -> Queue:
        """The queue this process reads replies from (as Celery declares it)."""
        arguments: dict[str, Any] = {}
        if self.options.expires is not None and self.options.expires > 0:
            arguments["x-expires"] = int(self.options.expires * 1000)
        return Queue(self.reply_to, exchange=Exchange(""), routing_key=self.reply_to,
                     durable=True, auto_delete=True, arguments=arguments)

    def _start_consuming(self) -> Consumer:
        """The reply consumer (made, declared and consuming on first use). Holds ``_reading``."""
        if self._consumer is None:
            connection = self._connection()
            consumer = Consumer(connection, [self.reply_queue()], self._on_message)
            try:
                connection.ensure_connection(max_retries=MAX_RECONNECTS, interval_start=0.1,
                                             interval_step=0.5, interval_max=2.0)
                connection.transport.declare(self.reply_queue())
                consumer.consume()
            except transport_errors.TransportError as exc:
                connection.close()
                _fail(f"consuming replies from {self.reply_to!r}", exc)
            self._consumer = consumer
        return self._consumer

    def on_task_call(self, task_id: str, reply_to: str | None) -> None:
        """Declare (and consume) the reply queue before a task that replies here is sent."""
        self._check_fork()
        if reply_to == self.reply_to:
            with self._reading:
                self._start_consuming()

    # -- replies --------------------------------------------------------------------------

    def _on_message(self, message: Message) -> None:
        try:
            meta = message.decode(self._codec.accept, self._codec.max_size)
            task_id = message.properties.get("correlation_id") or (
                meta.get("task_id") if isinstance(meta, dict) else None)
            if isinstance(meta, dict) and task_id:
                self._buffer(str(task_id), meta)
            else:
                logger.warning("dropped a reply on %r that is not a result meta",
                               self.reply_to)
        except transport_errors.SerializationError as exc:
            logger.warning("dropped an unreadable reply on %r: %s", self.reply_to, exc)
        message.ack()

    def _buffer(self, task_id: str, meta: dict[str, Any]) -> None:
        for name, default in (("result", None), ("traceback", None), ("children", []),
                              ("date_done", None), ("task_id", task_id)):
            meta.setdefault(name, default)
        with self._changed:
            current = self._metas.get(task_id)
            if (current is not None and current["status"] in states.READY_STATES
                    and meta.get("status") not in states.READY_STATES):
                return  # a late STARTED/RETRY never hides the final state
            self._metas[task_id] = meta  # type: ignore[assignment]
            self._metas.move_to_end(task_id)
            while len(self._metas) > MAX_BUFFERED:
                self._metas.popitem(last=False)
            self._changed.notify_all()

    def _drain(self, timeout: float) -> None:
        """Read what the reply queue has (waiting up to ``timeout``). Holds ``_reading``."""
        consumer = self._start_consuming()
        for attempt in range(MAX_RECONNECTS + 1):
            try:
                consumer.drain_events(timeout=timeout)
                return
            except transport_errors.BrokerConnectionError as exc:
                if attempt == MAX_RECONNECTS:
                    _fail(f"reading replies from {self.reply_to!r}", exc)
                logger.warning("reply consumer lost its connection (%s); reconnecting", exc)
                try:
                    consumer.connection.close()
                    consumer.connection.ensure_connection(
                        max_retries=MAX_RECONNECTS, interval_start=0.1, interval_step=0.5,
                        interval_max=2.0)
                    consumer.connection.transport.declare(self.reply_queue())
                except transport_errors.TransportError as again:
                    _fail(f"reconnecting the reply consumer of {self.reply_to!r}", again)
            except transport_errors.TransportError as exc:
                _fail(f"reading replies from {self.reply_to!r}", exc)

    def _read_now(self) -> None:
        self._check_fork()
        with self._reading:
            self._drain(0.0)

    def _buffered(self, task_id: str) -> ResultMeta:
        with self._changed:
            meta = self._metas.get(task_id)
            if meta is None:
                return make_meta(task_id, states.PENDING, None)
            return dict(meta)  # type: ignore[return-value]

    def get_task_meta(self, task_id: str) -> ResultMeta:
        """The latest state this process received for ``task_id`` (PENDING when none)."""
        self._read_now()
        return self._buffered(task_id)

    def get_task_metas(self, task_ids: Iterable[str]) -> dict[str, ResultMeta]:
        """The latest states of ``task_ids``, after one read of the reply queue."""
        self._read_now()
        return {task_id: self._buffered(task_id) for task_id in dict.fromkeys(task_ids)}

    def task_result_exists(self, task_id: str) -> bool:
        """True when this process received a reply for ``task_id``."""
        return self.get_task_meta(task_id)["status"] != states.PENDING

    def wait_for(
        self, task_id: str, timeout: float | None = None, interval: float = 0.5
    ) -> ResultMeta:
        """Block until ``task_id`` is ready (``interval`` is unused).

        One waiting thread at a time reads the reply queue; the others sleep
        until it buffers a reply (any task's) or a slice ends, then look again.

        Raises:
            taskframe.errors.TimeoutError: not ready within ``timeout``.
            BackendError: the broker failed, even after reconnecting.
        """
        self._check_fork()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            meta = self._buffered(task_id)
            if meta["status"] in states.READY_STATES:
                return meta
            remaining = POLL_SLICE if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                raise ResultTimeout(f"task {task_id} not ready after {timeout} s")
            if self._reading.acquire(blocking=False):
                try:
                    self._drain(min(remaining, POLL_SLICE))
                finally:
                    self._reading.release()
            else:
                with self._changed:
                    if task_id not in self._metas or (
                            self._metas[task_id]["status"] not in states.READY_STATES):
                        self._changed.wait(min(remaining, POLL_SLICE))

    def forget(self, task_id: str) -> None:
        """Drop the buffered state of ``task_id`` (nothing is stored on the broker)."""
        with self._changed:
            self._metas.pop(task_id, None)

    # -- sending (the worker side) ------------------------------------------------------

    def store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        *,
        traceback: str | None = None,
        context: ResultContext | None = None,
    ) -> ResultMeta:
        """Send the meta to the request's ``reply_to`` (nothing when it has none).

        Raises:
            EncodeError: the result cannot be serialized.
            BackendError: the broker could not be reached, even after retries.
        """
        meta = make_meta(task_id, state, result, traceback=traceback, context=context,
                         extended=self.options.extended)
        reply_to = context.reply_to if context is not None else None
        if not reply_to:
            return meta
        envelope = Envelope(
            body=self._codec.encode(meta), content_type=self._codec.content_type,
            content_encoding=self._codec.content_encoding,
            properties={"correlation_id": (context.correlation_id if context else None)
                        or task_id, "delivery_mode": self.delivery_mode},
        )
        connection = self._acquire()
        try:
            Producer(connection).send(envelope, routing_key=reply_to, retry=True,
                                      retry_policy=RETRY_POLICY)
        except transport_errors.PublishError as exc:
            logger.warning("the %s reply of task %s to %r was not delivered (its client is "
                           "gone?): %s", state, task_id, reply_to, exc)
        except transport_errors.TransportError as exc:
            _fail(f"sending the result of {task_id} to {reply_to!r}", exc)
        finally:
            self._release(connection)
        return meta

    def _acquire(self) -> Connection:
        """An idle publishing connection, or a new one.

        A transport serves one thread at a time: each concurrent publisher
        (thread or greenlet) takes its own, and gives it back for reuse.
        """
        self._check_fork()
        with self._lock:
            if self._idle:
                return self._idle.pop()
        connection = self._connection()
        with self._lock:
            self._publishers.append(connection)
        return connection

    def _release(self, connection: Connection) -> None:
        with self._lock:
            if connection in self._publishers:  # not closed (or forked) meanwhile
                self._idle.append(connection)

    def mark_as_revoked(self, task_id: str, reason: str = "revoked", *,
                        context: ResultContext | None = None) -> ResultMeta:
        """Send REVOKED (nothing is stored, so there is no earlier state to keep)."""
        from taskframe.errors import TaskRevokedError

        return self.store_result(task_id, TaskRevokedError(reason), states.REVOKED,
                                 context=context)

    # -- unsupported ----------------------------------------------------------------------

    def save_group(self, group_id: str, result: Any) -> None:
        """Not supported: raises ``ImproperlyConfigured``."""
        _unsupported("store groups")

    def restore_group(self, group_id: str) -> Any | None:
        """Not supported: raises ``ImproperlyConfigured``."""
        _unsupported("restore groups")

    def delete_group(self, group_id: str) -> None:
        """Not supported: raises ``ImproperlyConfigured``."""
        _unsupported("delete groups")

    def incr(self, key: str) -> int:
        """Not supported (no chords on rpc): raises ``ImproperlyConfigured``."""
        _unsupported("count chord parts")

    def close(self) -> None:
        """Close the reply consumer and the publishing connections. Idempotent."""
        self._check_fork()  # a forked child has nothing of its own to close yet
        with self._reading:
            consumer, self._consumer = self._consumer, None
        with self._lock:
            publishers, self._publishers, self._idle = self._publishers, [], []
        if consumer is not None:
            consumer.cancel()
            consumer.connection.close()
        for connection in publishers:
            connection.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} reply_to={self.reply_to!r}>"


def _fail(what: str, exc: Exception) -> NoReturn:
    raise BackendError(f"{what} failed: {type(exc).__name__}: {exc}") from exc


def _unsupported(what: str) -> NoReturn:
    raise ImproperlyConfigured(
        f"the rpc:// result backend cannot {what} (as in Celery): use the redis or "
        "database result backend for groups and chords")
