"""``Task``: a registered function that can be called now or sent to a worker.

One ``Task`` instance per decorated function (no class generated per task).
``Task`` is generic over the function's parameters and return type, so a type
checker rejects ``add.delay("x")`` for ``def add(a: int, b: int) -> int``.

Subclass ``Task`` and pass ``base=`` to ``@app.task`` to share hooks
(``before_start``, ``on_success``, ``on_failure``, ``on_retry``,
``after_return``) or option defaults between tasks.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Coroutine, Sequence
from datetime import datetime, timedelta
from typing import (
    TYPE_CHECKING,
    Any,
    ClassVar,
    Generic,
    Literal,
    NoReturn,
    ParamSpec,
    TypeVar,
    overload,
)

from taskframe.canvas import Signature, chunks, xmap, xstarmap
from taskframe.canvas.chords import add_to_chord, replace_task
from taskframe.client.retry import publish_retry
from taskframe.context import Context, current_request
from taskframe.current import current_app
from taskframe.errors import Ignore, MaxRetriesExceededError, Retry
from taskframe.events.worker_events import send_task_event
from taskframe.execution.eager import run_eager
from taskframe.result import AsyncResult

if TYPE_CHECKING:
    from taskframe.backends.base import Backend
    from taskframe.client.app import Taskframe
    from taskframe.result import AsyncResult, EagerResult

__all__ = ["Task"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

#: Options ``@app.task(...)`` accepts besides ``name``, ``bind`` and ``base``.
TASK_OPTIONS = frozenset({
    "acks_late", "acks_on_failure_or_timeout", "autoretry_for", "default_retry_delay",
    "expires", "ignore_result", "max_retries", "priority", "queue", "rate_limit",
    "reject_on_worker_lost", "retry_backoff", "retry_backoff_max", "retry_jitter",
    "retry_kwargs", "serializer", "soft_time_limit", "store_errors_even_if_ignored",
    "throws", "time_limit", "track_started", "typing", "compression", "exchange", "routing_key",
})


class Task(Generic[P, R]):
    """A task: call it directly, ``delay()`` it, or ``apply_async()`` it with options.

    Class attributes are option defaults; ``None`` means "use the app setting".
    """

    name: str = ""
    max_retries: int | None = 3
    default_retry_delay: float = 180.0
    acks_late: bool | None = None
    acks_on_failure_or_timeout: bool | None = None
    reject_on_worker_lost: bool | None = None
    ignore_result: bool | None = None
    store_errors_even_if_ignored: bool | None = None
    track_started: bool | None = None
    rate_limit: str | None = None
    time_limit: float | None = None
    soft_time_limit: float | None = None
    serializer: str | None = None
    compression: str | None = None
    priority: int | None = None
    queue: str | None = None
    exchange: str | None = None
    routing_key: str | None = None
    expires: float | datetime | None = None
    autoretry_for: tuple[type[BaseException], ...] = ()
    retry_kwargs: dict[str, Any] = {}
    retry_backoff: bool | float = False
    retry_backoff_max: float = 600.0
    retry_jitter: bool = True
    throws: tuple[type[BaseException], ...] = ()
    typing: bool = True
    abstract: ClassVar[bool] = False

    def __init__(
        self,
        fn: Callable[..., R] | None = None,
        *,
        app: Taskframe | None = None,
        name: str | None = None,
        bind: bool = False,
        **options: Any,
    ) -> None:
        unknown = set(options) - TASK_OPTIONS
        if unknown:
            raise TypeError(f"unknown task option(s): {', '.join(sorted(unknown))}")
        self._fn = fn
        self._app = app
        self._bind = bind
        for key, value in options.items():
            setattr(self, key, value)
        if fn is not None:
            self.__doc__ = fn.__doc__
            self.__wrapped__ = fn
            self.__module__ = fn.__module__
        self.name = name or self.name or self._default_name()
        self._signature: inspect.Signature | None = None

    def _default_name(self) -> str:
        target: Any = self._fn if self._fn is not None else type(self)
        module = target.__module__
        if module == "__main__" and self._app is not None and self._app.main:
            module = self._app.main
        return f"{module}.{target.__name__}"

    # -- app and request ----------------------------------------------------------------

    @property
    def app(self) -> Taskframe:
        """The app this task belongs to (the current app for ``shared_task``)."""
        if self._app is None:
            return current_app()
        return self._app

    def bind_app(self, app: Taskframe) -> None:
        """Attach this task to ``app`` (used when registering)."""
        self._app = app

    @property
    def request(self) -> Context:
        """The request of the run in progress (an empty context outside a run)."""
        ctx = current_request()
        if ctx is not None and ctx.task == self.name:
            return ctx
        return Context(task=self.name)

    @property
    def backend(self) -> Backend:
        """The app's result backend."""
        return self.app.backend

    # -- calling ----------------------------------------------------------------------

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the task here and now, like the plain function."""
        return self.run(*args, **kwargs)

    def run(self, *args: Any, **kwargs: Any) -> R:
        """The task body: the decorated function, or a subclass's override."""
        if self._fn is None:
            raise NotImplementedError(f"task {self.name!r} has no function and no run()")
        if self._bind:
            return self._fn(self, *args, **kwargs)
        return self._fn(*args, **kwargs)

    # An ``async def`` task is a Task[P, Coroutine[..., T]]: its result holds T.
    @overload
    def delay(self: Task[P, Coroutine[Any, Any, T]], *args: P.args,
              **kwargs: P.kwargs) -> AsyncResult[T]: ...
    @overload
    def delay(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult[R]: ...

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult[Any]:
        """Send the task to a worker with these arguments; shortcut of ``apply_async``."""
        return self.apply_async(args, kwargs)

    @overload
    def apply_async(self: Task[P, Coroutine[Any, Any, T]], args: Sequence[Any] | None = ...,
                    kwargs: dict[str, Any] | None = ..., **options: Any) -> AsyncResult[T]: ...
    @overload
    def apply_async(self, args: Sequence[Any] | None = ..., kwargs: dict[str, Any] | None = ...,
                    **options: Any) -> AsyncResult[R]: ...

    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> AsyncResult[Any]:
        """Send the task with options (countdown, eta, expires, queue, priority, link, ...).

        Runs at once, in this process, when ``task_always_eager`` is set.
        """
        args = list(args or ())
        kwargs = dict(kwargs or {})
        if self.typing:
            self.check_arguments(args, kwargs)
        if self.app.conf.task_always_eager:
            return self.apply(args, kwargs, **options)
        return self.app.send_task(self.name, args, kwargs, task=self, **options)

    @overload
    def apply(self: Task[P, Coroutine[Any, Any, T]], args: Sequence[Any] | None = ...,
              kwargs: dict[str, Any] | None = ..., **options: Any) -> EagerResult[T]: ...
    @overload
    def apply(self, args: Sequence[Any] | None = ..., kwargs: dict[str, Any] | None = ...,
              **options: Any) -> EagerResult[R]: ...

    def apply(
        self,
        args: Sequence[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> EagerResult[Any]:
        """Run the task in this process now and return an ``EagerResult``."""
        return run_eager(self, list(args or ()), dict(kwargs or {}), options)

    def check_arguments(self, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
        """Raise ``TypeError`` now when the arguments do not fit the function."""
        if self._fn is None:
            return
        if self._signature is None:
            self._signature = inspect.signature(self._fn)
        try:
            if self._bind:
                self._signature.bind(None, *args, **kwargs)
            else:
                self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self.name}: {exc}") from None

    # -- retries ----------------------------------------------------------------------

    @overload
    def retry(self, args: Sequence[Any] | None = ..., kwargs: dict[str, Any] | None = ...,
              exc: BaseException | None = ..., throw: Literal[True] = ...,
              eta: datetime | None = ..., countdown: float | timedelta | None = ...,
              max_retries: int | None = ..., **options: Any) -> NoReturn: ...
    @overload
    def retry(self, args: Sequence[Any] | None = ..., kwargs: dict[str, Any] | None = ...,
              exc: BaseException | None = ..., *, throw: Literal[False],
              eta: datetime | None = ..., countdown: float | timedelta | None = ...,
              max_retries: int | None = ..., **options: Any) -> Retry: ...

    def retry(
        self,
        args: Sequence[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        exc: BaseException | None = None,
        throw: bool = True,
        eta: datetime | None = None,
        countdown: float | timedelta | None = None,
        max_retries: int | None = None,
        **options: Any,
    ) -> Retry:
        """Run this task again later, then stop the current run by raising ``Retry``.

        Raises ``exc`` (or ``MaxRetriesExceededError``) instead once the task
        has been retried ``max_retries`` times. With ``throw=False`` the next run
        is still sent but ``Retry`` is returned, not raised: the current run goes
        on and its own outcome is stored (Celery's behaviour).
        """
        request = self.request
        if request.called_directly:
            raise exc if exc is not None else Retry("task called directly: cannot retry")
        limit = self.max_retries if max_retries is None else max_retries
        if limit is not None and request.retries >= limit:
            if exc is not None:
                raise exc
            raise MaxRetriesExceededError(
                f"Can't retry {self.name}[{request.id}] args:{request.args} "
                f"kwargs:{request.kwargs}"
            )
        if isinstance(countdown, timedelta):
            countdown = countdown.total_seconds()
        if eta is None and countdown is None:
            countdown = self.default_retry_delay
        when: float | datetime | None = eta if eta is not None else countdown
        if not request.is_eager:
            publish_retry(self, request, args, kwargs, eta=eta, countdown=countdown, **options)
        retry = Retry(exc=exc, when=when, is_eager=request.is_eager)
        if throw:
            raise retry
        return retry

    def autoretry_countdown(self, retries: int) -> float:
        """The countdown an ``autoretry_for`` retry uses (exponential with ``retry_backoff``)."""
        if not self.retry_backoff:
            return float(self.retry_kwargs.get("countdown", self.default_retry_delay))
        factor = 1.0 if self.retry_backoff is True else float(self.retry_backoff)
        countdown = min(self.retry_backoff_max, factor * (2.0**retries))
        if self.retry_jitter:
            countdown = random.uniform(0, countdown)
        return countdown

    def send_event(self, type_: str, **fields: Any) -> None:
        """Send a custom event (``task-progress``, ...) about the running task, as
        Celery's ``Task.send_event``: ``uuid`` is set, Flower and ``taskframe events``
        show it. Nothing is sent outside a worker that sends events."""
        send_task_event(type_, **fields)

    # -- signatures and results ---------------------------------------------------------

    def signature(self, args: Sequence[Any] | None = None, kwargs: dict[str, Any] | None = None,
                  **options: Any) -> Signature:
        """A signature of this task with partial arguments and options."""
        return Signature(self.name, args, kwargs, options, app=self._app)

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """``signature(args, kwargs)``: the parent's result is prepended when linked."""
        return self.signature(args, kwargs)

    def si(self, *args: Any, **kwargs: Any) -> Signature:
        """An immutable signature: linking does not add the parent's result."""
        sig = self.signature(args, kwargs)
        sig["immutable"] = True
        return sig

    def map(self, it: Any) -> Signature:
        """One message that calls this task once per item (Celery's ``xmap``)."""
        return xmap(self, it, app=self._app)

    def starmap(self, it: Any) -> Signature:
        """One message that calls this task with ``*item`` per item (``xstarmap``)."""
        return xstarmap(self, it, app=self._app)

    def chunks(self, it: Any, n: int) -> Signature:
        """Split ``it`` into parts of ``n`` argument tuples, one message per part."""
        return chunks(self, it, n, app=self._app)

    def replace(self, sig: Any) -> Any:
        """Replace the running task by ``sig``: it takes this task's id, links and chain.

        Raises ``Ignore`` so nothing is stored for this run (the replacement's
        result is). When the task runs eagerly, returns the replacement's value.
        """
        if self.request.is_eager:
            return replace_task(self, sig)
        replace_task(self, sig)
        raise Ignore("Replaced by new task")

    def add_to_chord(self, sig: Any, lazy: bool = False) -> Any:
        """Add ``sig`` to the header of the chord this task belongs to; returns its result."""
        return add_to_chord(self, sig, lazy)

    def AsyncResult(self, task_id: str) -> AsyncResult[R]:
        """A result handle for ``task_id`` of this task."""
        return AsyncResult(task_id, app=self.app, task_name=self.name)

    # -- hooks (override in a base class) -----------------------------------------------

    def before_start(self, task_id: str, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
        """Called in the worker before the task runs."""

    def on_success(self, retval: Any, task_id: str, args: Sequence[Any],
                   kwargs: dict[str, Any]) -> None:
        """Called in the worker after the task succeeded."""

    def on_failure(self, exc: BaseException, task_id: str, args: Sequence[Any],
                   kwargs: dict[str, Any], einfo: str | None) -> None:
        """Called in the worker after the task failed."""

    def on_retry(self, exc: BaseException, task_id: str, args: Sequence[Any],
                 kwargs: dict[str, Any], einfo: str | None) -> None:
        """Called in the worker when the task is to be retried."""

    def after_return(self, status: str, retval: Any, task_id: str, args: Sequence[Any],
                     kwargs: dict[str, Any], einfo: str | None) -> None:
        """Called in the worker after any outcome."""

    def __repr__(self) -> str:
        return f"<@task: {self.name}>"
