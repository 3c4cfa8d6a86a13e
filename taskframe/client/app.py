"""The app: settings, the task registry, and sending tasks.

``Taskframe`` (alias ``Celery``) is the object users create once per project::

    app = Taskframe("proj", broker="amqp://", backend="redis://")

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

With no broker configured it uses the embedded SQLite file
``taskframe.sqlite3`` for messages and results, and logs once that it does so.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import sys
import threading
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar, overload

from taskframe import signals
from taskframe.backends import create_backend, needs_task_call
from taskframe.backends.base import Backend, BackendOptions
from taskframe.client.builtins import register_builtins
from taskframe.client.router import Router
from taskframe.client.task import Task
from taskframe.config import Settings
from taskframe.context import current_request
from taskframe.control.client import Control
from taskframe.current import current_app, set_current_app
from taskframe.defaults import EMBEDDED_BACKEND_URL, EMBEDDED_BROKER_URL
from taskframe.errors import ImproperlyConfigured, NotRegistered
from taskframe.events.sent import send_task_sent
from taskframe.protocol import TaskMessage, encode_task
from taskframe.result import AsyncResult
from taskframe.transport import Connection, Envelope, dumps
from taskframe.transport.serialization import compress

__all__ = ["Celery", "Taskframe", "current_app", "shared_task"]

logger = logging.getLogger("taskframe.app")

P = ParamSpec("P")
R = TypeVar("R")

_state_lock = threading.RLock()
_all_apps: list[Taskframe] = []
_shared_tasks: list[Task[Any, Any]] = []
# Clients a forked child inherited from its parent: referenced forever, never closed.
_inherited_clients: list[tuple[Any, ...]] = []


class Taskframe:
    """A taskframe application.

    Args:
        main: the name of the main module (task names in ``__main__`` use it).
        broker: ``broker_url``; defaults to the embedded SQLite file.
        backend: ``result_backend``; defaults to the embedded SQLite file when the
            broker is the embedded default too, else no backend.
        include: modules to import when a worker starts (``include`` setting).
        config_source: passed to ``config_from_object``.
        namespace: the prefix of setting names in ``config_source``.
        set_as_current: make this the app ``shared_task`` and results use.
        task_cls: the default base class of tasks.
    """

    def __init__(
        self,
        main: str | None = None,
        *,
        broker: str | None = None,
        backend: str | None = None,
        include: Sequence[str] | None = None,
        config_source: object | str | None = None,
        namespace: str | None = None,
        set_as_current: bool = True,
        task_cls: type[Task[Any, Any]] = Task,
    ) -> None:
        self.main = main
        self.conf = Settings()
        self.task_cls = task_cls
        self.tasks: dict[str, Task[Any, Any]] = {}
        if config_source is not None:
            self.conf.config_from_object(config_source, namespace=namespace)
        if broker is not None:
            self.conf.broker_url = broker
        if backend is not None:
            self.conf.result_backend = backend
        if include:
            self.conf.include = tuple(include)
        self._local = threading.local()
        self._lock = threading.RLock()
        self._backend: Backend | None = None
        self._router: Router | None = None
        self._connections: list[Connection] = []
        self._warned_no_backend = False
        self._logged_embedded = False
        #: Called where tasks run when a worker starts / stops (``on_worker_start``).
        self.worker_start_hooks: list[Callable[[], Any]] = []
        self.worker_stop_hooks: list[Callable[[], Any]] = []
        self.origin = f"gen{os.getpid()}@{socket.gethostname()}"
        register_builtins(self)  # celery.map, celery.chord_unlock, ... (Celery canvases)
        with _state_lock:
            _all_apps.append(self)
            for shared in _shared_tasks:
                self.tasks.setdefault(shared.name, shared)
            if set_as_current:
                set_current_app(self)

    # -- worker lifecycle hooks ----------------------------------------------------------

    def on_worker_start(self, fn: Callable[[], Any], /) -> Callable[[], Any]:
        """Decorator: call ``fn`` (sync or ``async def``) where tasks run, as a worker starts.

        For resources tasks share, such as a database pool: it runs once in the
        worker process for in-process pools, on the event loop for ``asyncio``,
        and in every child for ``prefork``. An error stops the worker.
        """
        self.worker_start_hooks.append(fn)
        return fn

    def on_worker_stop(self, fn: Callable[[], Any], /) -> Callable[[], Any]:
        """Decorator: call ``fn`` (sync or ``async def``) where tasks ran, as a worker stops."""
        self.worker_stop_hooks.append(fn)
        return fn

    # -- configuration -----------------------------------------------------------------

    def config_from_object(self, obj: object | str, *, namespace: str | None = None,
                           silent: bool = False) -> None:
        """Read settings from an object or a module (path), lazily."""
        self.conf.config_from_object(obj, namespace=namespace, silent=silent)
        self._reset_clients()

    def config_from_envvar(self, variable_name: str, *, namespace: str | None = None,
                           silent: bool = False) -> bool:
        """Read settings from the module named by environment variable ``variable_name``."""
        module = os.environ.get(variable_name)
        if not module:
            if silent:
                return False
            raise ImproperlyConfigured(
                f"environment variable {variable_name!r} is not set: it must name a settings module"
            )
        self.config_from_object(module, namespace=namespace, silent=silent)
        return True

    def autodiscover_tasks(self, packages: Iterable[str] | Callable[[], Iterable[str]],
                           related_name: str = "tasks") -> list[str]:
        """Import ``<package>.<related_name>`` for each package that has one."""
        names = packages() if callable(packages) else packages
        imported = []
        for package in names:
            module_name = f"{package}.{related_name}" if related_name else package
            try:
                importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name != module_name:
                    raise
                continue
            imported.append(module_name)
        return imported

    def import_modules(self) -> None:
        """Import the modules named by the ``imports`` and ``include`` settings."""
        for name in (*self.conf.imports, *self.conf.include):
            importlib.import_module(name)

    @property
    def broker_url(self) -> str:
        """The broker URL in force (the embedded SQLite file when none is set)."""
        url = self.conf.broker_url
        if url:
            return str(url)
        self._log_embedded()
        return EMBEDDED_BROKER_URL

    @property
    def result_backend_url(self) -> str | None:
        """The result backend URL in force, or None when results are disabled."""
        url = self.conf.result_backend
        if url:
            return str(url)
        if not self.conf.broker_url:
            self._log_embedded()
            return EMBEDDED_BACKEND_URL
        return None

    def _log_embedded(self) -> None:
        if not self._logged_embedded:
            self._logged_embedded = True
            logger.warning(
                "No broker_url configured: using the embedded SQLite file %s for messages "
                "and results (set broker_url / result_backend to use a server).",
                os.path.abspath(EMBEDDED_BROKER_URL.removeprefix("sqlite:///")),
            )

    # -- tasks ------------------------------------------------------------------------

    @overload
    def task(self, fn: Callable[P, R], /) -> Task[P, R]: ...
    @overload
    def task(self, *, bind: Literal[True], name: str | None = ...,
             base: type[Task[Any, Any]] | None = ..., **options: Any
             ) -> Callable[[Callable[Concatenate[Any, P], R]], Task[P, R]]: ...
    @overload
    def task(self, *, bind: Literal[False] = ..., name: str | None = ...,
             base: type[Task[Any, Any]] | None = ..., **options: Any
             ) -> Callable[[Callable[P, R]], Task[P, R]]: ...

    def task(self, fn: Callable[..., Any] | None = None, /, *,  # type: ignore[misc]
             bind: bool = False,
             name: str | None = None, base: type[Task[Any, Any]] | None = None,
             **options: Any) -> Any:
        """Register a function as a task: ``@app.task`` or ``@app.task(bind=True, ...)``."""
        def decorator(func: Callable[..., Any]) -> Task[Any, Any]:
            cls = base or self.task_cls
            task = cls(func, app=self, name=name, bind=bind, **options)
            return self.register_task(task)
        if fn is not None:
            return decorator(fn)
        return decorator

    def register_task(self, task: Task[Any, Any]) -> Task[Any, Any]:
        """Add a task object (e.g. an instance of a ``Task`` subclass with ``run``)."""
        task.bind_app(self)
        self.tasks[task.name] = task
        return task

    def get_task(self, name: str) -> Task[Any, Any]:
        """The registered task called ``name``; ``NotRegistered`` when there is none."""
        try:
            return self.tasks[name]
        except KeyError:
            raise NotRegistered(name) from None

    # -- clients ----------------------------------------------------------------------

    @property
    def router(self) -> Router:
        """Resolves queues and routes from the settings."""
        if self._router is None:
            self._router = Router(self.conf)
        return self._router

    @property
    def backend(self) -> Backend:
        """The result backend, created on first use."""
        if self._backend is None:
            with self._lock:
                if self._backend is None:
                    self._backend = create_backend(self.result_backend_url, self.backend_options())
        return self._backend

    @property
    def control(self) -> Control:
        """Remote control of the workers (``app.control.inspect().active()``, ``revoke``)."""
        control: Control | None = self.__dict__.get("_control")
        if control is None:
            with self._lock:
                control = self.__dict__.setdefault("_control", Control(self))
        return control

    def backend_options(self) -> BackendOptions:
        """The backend settings, copied out of ``conf``."""
        c = self.conf
        accept = c.result_accept_content or c.accept_content
        return BackendOptions(
            serializer=c.result_serializer,
            accept=tuple(accept),
            expires=_seconds(c.result_expires),
            failure_expires=_seconds(c.result_failure_expires),
            extended=bool(c.result_extended),
            table_names=dict(c.database_table_names or {}),
            engine_options=dict(c.database_engine_options or {}),
            create_tables_at_setup=bool(c.database_create_tables_at_setup),
            short_lived_sessions=bool(c.database_short_lived_sessions),
            transport_options=dict(c.result_backend_transport_options or {}),
            connection=self.connection, reply_to=self.origin,
            persistent=bool(c.result_persistent),
        )

    def connection(self, url: str | None = None) -> Connection:
        """A new broker connection (not yet connected)."""
        options = dict(self.conf.broker_transport_options or {})
        if self.conf.broker_heartbeat is not None:
            options.setdefault("heartbeat", float(self.conf.broker_heartbeat))
        if self.conf.broker_use_ssl:
            options.setdefault("ssl", self.conf.broker_use_ssl)
        return Connection(
            url or self.broker_url,
            transport_options=options,
            connect_timeout=float(self.conf.broker_connection_timeout or 4.0),
        )

    def producer_connection(self) -> Connection:
        """This thread's publishing connection (created and connected on first use)."""
        conn: Connection | None = getattr(self._local, "connection", None)
        if conn is None:
            conn = self.connection(self.conf.broker_write_url or None)
            # A client gives up as a publish would: task_publish_retry_policy, not the
            # worker's broker_connection_max_retries (which may be 100 long backoffs).
            policy = {**self.conf.task_publish_retry_policy}
            conn.ensure_connection(
                max_retries=int(policy.get("max_retries", 3)) if self.conf.task_publish_retry
                else 0,
                interval_start=float(policy.get("interval_start", 0.0)),
                interval_step=float(policy.get("interval_step", 0.2)),
                interval_max=float(policy.get("interval_max", 1.0)),
            )
            self._local.connection = conn
            self._local.declared = weakref.WeakKeyDictionary()
            with self._lock:
                self._connections.append(conn)
        return conn

    def _reset_clients(self) -> None:
        self._router = None
        if self._backend is not None:
            self._backend.close()
            self._backend = None

    def _after_fork(self) -> None:
        """Forget the clients inherited from the parent process (prefork children).

        They are kept referenced, never closed: closing would end the parent's
        sockets (an AMQP close frame, a SQLite handle). The child opens its own.
        """
        # No lock taken: another thread of the parent may have held one at fork time.
        _inherited_clients.append((self._connections, self._local, self._backend,
                                   self.__dict__.pop("_control", None)))
        self._lock = threading.RLock()
        self._connections = []
        self._local = threading.local()
        self._backend = None

    def close(self, *, backend: bool = True) -> None:
        """Close every broker connection this app opened, and the backend unless told not to."""
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
            self._local = threading.local()
            if backend and self._backend is not None:
                self._backend.close()
                self._backend = None

    # -- sending ----------------------------------------------------------------------

    def send_task(
        self,
        name: str,
        args: Sequence[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        *,
        countdown: float | timedelta | None = None,
        eta: datetime | None = None,
        expires: float | timedelta | datetime | None = None,
        task_id: str | None = None,
        priority: int | None = None,
        headers: dict[str, Any] | None = None,
        link: Any = None,
        link_error: Any = None,
        serializer: str | None = None,
        compression: str | None = None,
        ignore_result: bool | None = None,
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
        shadow: str | None = None,
        task: Task[Any, Any] | None = None,
        **options: Any,
    ) -> AsyncResult[Any]:
        """Send a task by name (it need not be registered here); return its result handle.

        ``options`` may carry ``queue``, ``exchange``, ``routing_key``, ``retries``,
        ``parent_id``, ``root_id``, ``group_id``, ``group_index``, ``chain``,
        ``chord``, ``reply_to``, ``retry`` and ``retry_policy``.
        """
        if task is None:
            task = self.tasks.get(name)
        args = list(args or ())
        kwargs = dict(kwargs or {})
        task_id = task_id or str(uuid.uuid4())
        now = datetime.now(UTC)
        delay = _delay_seconds(countdown, eta, now)
        if delay is not None and eta is None:
            eta = now + timedelta(seconds=delay)
        expires_at = _expires_at(expires if expires is not None else
                                 (task.expires if task is not None else None), now)
        if ignore_result is None and task is not None:
            ignore_result = _resolve(task.ignore_result, self.conf.task_ignore_result)
        if task is not None:
            time_limit = time_limit if time_limit is not None else _resolve(
                task.time_limit, self.conf.task_time_limit)
            soft_time_limit = soft_time_limit if soft_time_limit is not None else _resolve(
                task.soft_time_limit, self.conf.task_soft_time_limit)
            priority = priority if priority is not None else task.priority
        if priority is None:
            priority = self.conf.task_default_priority
        parent = current_request()
        message = TaskMessage(
            id=task_id, name=name, args=args, kwargs=kwargs, eta=eta, expires=expires_at,
            retries=int(options.pop("retries", 0)),
            group=options.pop("group_id", None), group_index=options.pop("group_index", None),
            root_id=options.pop("root_id", None) or (parent.root_id or parent.id
                                                     if parent and parent.id else task_id),
            parent_id=options.pop("parent_id", None) or (parent.id if parent else None),
            time_limit=time_limit, soft_time_limit=soft_time_limit, shadow=shadow,
            origin=self.origin, ignore_result=ignore_result,
            callbacks=_signatures(link), errbacks=_signatures(link_error),
            chain=options.pop("chain", None), chord=options.pop("chord", None),
            correlation_id=task_id, reply_to=options.pop("reply_to", None) or self.origin,
            priority=priority, extra_headers=dict(headers or {}),
            replaced_task_nesting=int(options.pop("replaced_task_nesting", None) or 0),
        )
        if task is not None:
            for key in ("exchange", "routing_key"):
                if options.get(key) is None and getattr(task, key, None) is not None:
                    options[key] = getattr(task, key)
        route = self.router.route(name, args, kwargs, options,
                                  task_queue=task.queue if task is not None else None)
        if not ignore_result and needs_task_call(self.result_backend_url):
            self.backend.on_task_call(task_id, message.reply_to)  # rpc: reply queue first
        self._publish(message, route, delay, serializer=serializer or (
            task.serializer if task is not None and task.serializer else None),
            compression=compression or (task.compression if task is not None else None),
            retry=options.pop("retry", None), retry_policy=options.pop("retry_policy", None))
        if not ignore_result and self.result_backend_url is None and not self._warned_no_backend:
            self._warned_no_backend = True
            warnings.warn(
                f"task {name!r} was sent but no result_backend is configured: its result "
                "cannot be read. Set result_backend or ignore_result=True.",
                RuntimeWarning, stacklevel=_user_stacklevel(),
            )
        return AsyncResult(task_id, app=self, task_name=name)

    def _publish(self, message: TaskMessage, route: Any, delay: float | None, *,
                 serializer: str | None, compression: str | None, retry: bool | None,
                 retry_policy: dict[str, Any] | None) -> None:
        headers, properties, body = encode_task(message, utc=bool(self.conf.enable_utc))
        signals.before_task_publish.send(
            sender=message.name, body=body, exchange=route.exchange,
            routing_key=route.routing_key, headers=headers, properties=properties,
            declare=[route.queue], retry_policy=retry_policy,
        )
        content_type, encoding, data = dumps(body, serializer or self.conf.task_serializer)
        compression = compression or self.conf.task_compression
        if compression:
            data, mime = compress(data, compression)
            headers["compression"] = mime
        properties["delivery_mode"] = _delivery_mode(self.conf.task_default_delivery_mode)
        envelope = Envelope(data, content_type, encoding, headers, properties)
        conn = self.producer_connection()
        use_retry = self.conf.task_publish_retry if retry is None else retry
        policy = {**self.conf.task_publish_retry_policy, **(retry_policy or {})}
        if not use_retry:
            policy["max_retries"] = 0

        def publish(transport: Any) -> None:
            # Declared once per transport: a reconnect brings a new transport, and the
            # broker may have lost non-durable declarations with the old link.
            declared = self._local.declared.setdefault(transport, set())
            if route.queue.name not in declared:
                transport.declare(route.queue)
                declared.add(route.queue.name)
            wait = bool(delay) and transport.can_delay(route.exchange, route.routing_key)
            transport.publish(envelope, exchange=route.exchange, routing_key=route.routing_key,
                              delay=delay if wait else None)

        conn.ensure(publish, policy)
        signals.after_task_publish.send(sender=message.name, body=body, headers=headers,
                                        exchange=route.exchange, routing_key=route.routing_key)
        if self.conf.task_send_sent_event:
            send_task_sent(self, headers, queue=route.queue.name, exchange=route.exchange,
                           routing_key=route.routing_key)

    def AsyncResult(self, task_id: str, task_name: str | None = None) -> AsyncResult[Any]:
        """A result handle for ``task_id``."""
        return AsyncResult(task_id, app=self, task_name=task_name)

    def __repr__(self) -> str:
        return f"<Taskframe {self.main or '__main__'}>"


#: Celery's name for the app class, for migration.
Celery = Taskframe


def shared_task(fn: Callable[..., Any] | None = None, /, **options: Any) -> Any:
    """``@app.task`` for reusable modules: the task joins every app, and resolves to the
    current one when called."""
    def decorator(func: Callable[..., Any]) -> Task[Any, Any]:
        base = options.pop("base", None) or Task
        task: Task[Any, Any] = base(func, app=None, **options)
        with _state_lock:
            _shared_tasks.append(task)
            for app in _all_apps:
                app.tasks.setdefault(task.name, task)
        return task
    if fn is not None:
        return decorator(fn)
    return decorator


def _user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside taskframe."""
    frame = sys._getframe(1)
    level = 1
    package_dir = os.path.dirname(os.path.abspath(__file__))
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(
            package_dir):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level


def _resolve(value: Any, default: Any) -> Any:
    return default if value is None else value


def _seconds(value: float | timedelta | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, timedelta):
        return value.total_seconds()
    return float(value)


def _delay_seconds(countdown: float | timedelta | None, eta: datetime | None,
                   now: datetime) -> float | None:
    if countdown is not None:
        return max(0.0, _seconds(countdown) or 0.0)
    if eta is not None:
        if eta.tzinfo is None:
            eta = eta.replace(tzinfo=UTC)
        return max(0.0, (eta - now).total_seconds())
    return None


def _expires_at(expires: float | timedelta | datetime | None, now: datetime) -> datetime | None:
    if expires is None:
        return None
    if isinstance(expires, datetime):
        return expires if expires.tzinfo else expires.replace(tzinfo=UTC)
    return now + timedelta(seconds=_seconds(expires) or 0.0)


def _signatures(value: Any) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    items = value if isinstance(value, list | tuple) else [value]
    return [dict(item) for item in items]


def _delivery_mode(value: Any) -> int:
    if value in ("transient", 1):
        return 1
    return 2
