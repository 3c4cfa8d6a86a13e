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

import functools
import importlib
import logging
import os
import socket
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar, overload

from taskframe.backends import create_backend, needs_task_call
from taskframe.backends.base import Backend, BackendOptions
from taskframe.client.builtins import register_builtins
from taskframe.client.router import Router
from taskframe.client.sending import SendOptions, compose, publish_task, seconds
from taskframe.client.task import Task
from taskframe.config import Settings
from taskframe.control.client import Control
from taskframe.current import current_app, set_current_app
from taskframe.defaults import EMBEDDED_BACKEND_URL, EMBEDDED_BROKER_URL
from taskframe.errors import ImproperlyConfigured, NotRegistered
from taskframe.result import AsyncResult
from taskframe.transport import Connection, Producer

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
            expires=seconds(c.result_expires),
            failure_expires=seconds(c.result_failure_expires),
            extended=bool(c.result_extended),
            table_names=dict(c.database_table_names or {}),
            engine_options=dict(c.database_engine_options or {}),
            create_tables_at_setup=bool(c.database_create_tables_at_setup),
            short_lived_sessions=bool(c.database_short_lived_sessions),
            transport_options=dict(c.result_backend_transport_options or {}),
            # rpc://: publishers (the worker's results) and a reply consumer read only
            # while a client waits: nobody services a heartbeat while they are idle.
            connection=functools.partial(self.connection, heartbeat=0), reply_to=self.origin,
            persistent=bool(c.result_persistent),
            max_message_size=int(c.worker_max_message_size or 0) or None,
        )

    def connection(self, url: str | None = None, *, heartbeat: float | None = None) -> Connection:
        """A new broker connection (not yet connected).

        Args:
            url: the broker URL (``broker_url`` by default).
            heartbeat: the AMQP heartbeat to ask for, over ``broker_heartbeat`` and the
                transport options (a ``?heartbeat=`` in the URL still wins, as in kombu).
                ``None`` for a connection whose owner services heartbeats (a loop that
                calls ``maintain()``: the worker's consumer, remote control); ``0`` for
                one nobody services while idle (publishing): RabbitMQ would close it
                after two missed beats and the next publish would reconnect.
        """
        options = dict(self.conf.broker_transport_options or {})
        if heartbeat is not None:
            options["heartbeat"] = float(heartbeat)
        elif self.conf.broker_heartbeat is not None:
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
            # Publishing only: no heartbeat, since nothing sends them while the client
            # is idle (Celery's connection_for_write negotiates none either).
            conn = self.connection(self.conf.broker_write_url or None, heartbeat=0)
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
            self._local.producer = Producer(conn)
            with self._lock:
                self._connections.append(conn)
        return conn

    def producer(self) -> Producer:
        """This thread's producer, on ``producer_connection()``: every task is sent by it."""
        producer: Producer | None = getattr(self._local, "producer", None)
        if producer is None:
            self.producer_connection()
            producer = self._local.producer
            assert producer is not None
        return producer

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
        opts = SendOptions(
            countdown=countdown, eta=eta, expires=expires, task_id=task_id, priority=priority,
            headers=headers, link=link, link_error=link_error, serializer=serializer,
            compression=compression, ignore_result=ignore_result, time_limit=time_limit,
            soft_time_limit=soft_time_limit, shadow=shadow, **SendOptions.lineage(options),
            routing=options,
        )
        message, delay = compose(self, name, list(args or ()), dict(kwargs or {}), task, opts)
        if task is not None:
            for key in ("exchange", "routing_key"):
                if opts.routing.get(key) is None and getattr(task, key, None) is not None:
                    opts.routing[key] = getattr(task, key)
        route = self.router.route(name, message.args, message.kwargs, opts.routing,
                                  task_queue=task.queue if task is not None else None)
        if not message.ignore_result and needs_task_call(self.result_backend_url):
            self.backend.on_task_call(message.id, message.reply_to)  # rpc: reply queue first
        publish_task(self, message, route, delay, opts, task)
        if (not message.ignore_result and self.result_backend_url is None
                and not self._warned_no_backend):
            self._warned_no_backend = True
            warnings.warn(
                f"task {name!r} was sent but no result_backend is configured: its result "
                "cannot be read. Set result_backend or ignore_result=True.",
                RuntimeWarning, stacklevel=_user_stacklevel(),
            )
        return AsyncResult(message.id, app=self, task_name=name)

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
    # taskframe/, not taskframe/client/: frames of the canvas or a task class are ours too.
    package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(
            package_dir):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level
