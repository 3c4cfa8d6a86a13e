"""The ``taskframe`` command: parse options, build the objects, call them.

``taskframe -A proj worker|call|result|purge ...``. Errors in what the user gave
(a missing ``-A`` module, bad JSON) print one line and exit non-zero; no
tracebacks.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from typing import Any, NoReturn

import click

from taskframe import __version__
from taskframe.cli.control import (
    control_command,
    inspect_command,
    revoke_command,
    status_command,
    worker_control_options,
)
from taskframe.cli.events import events_command, worker_event_options
from taskframe.client.app import Taskframe
from taskframe.errors import ImproperlyConfigured, TaskframeError, TimeoutError
from taskframe.pools import POOLS
from taskframe.transport.errors import TransportError

__all__ = ["EX_FAILURE", "EX_OK", "EX_UNAVAILABLE", "EX_USAGE", "find_app", "main"]

EX_OK = 0
EX_FAILURE = 1
EX_USAGE = 64
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75


def fail(message: str, code: int = EX_USAGE) -> NoReturn:
    """Print ``message`` as one line on stderr and exit with ``code``."""
    click.echo(f"Error: {' '.join(message.split())}", err=True)
    sys.exit(code)


def find_app(spec: str) -> Taskframe:
    """Resolve ``-A``: ``proj``, ``proj.app``, ``proj:app`` or ``proj:create_app`` (a factory)."""
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not module_name.startswith(exc.name):
            raise
        if attr or "." not in module_name:
            raise ImproperlyConfigured(
                f"cannot import module {module_name!r} (-A {spec})") from exc
        parent, _, attr = module_name.rpartition(".")
        module = importlib.import_module(parent)
    if attr:
        try:
            found = getattr(module, attr)
        except AttributeError:
            raise ImproperlyConfigured(f"module {module.__name__!r} has no {attr!r}") from None
    else:
        found = _app_in_module(module)
    if not isinstance(found, Taskframe) and callable(found):
        found = found()
    if not isinstance(found, Taskframe):
        raise ImproperlyConfigured(f"-A {spec}: {found!r} is not a taskframe app")
    return found


def _app_in_module(module: Any) -> Any:
    for name in ("app", "taskframe", "celery"):
        candidate = getattr(module, name, None)
        if isinstance(candidate, Taskframe):
            return candidate
    apps = [v for v in vars(module).values() if isinstance(v, Taskframe)]
    if len(apps) == 1:
        return apps[0]
    for sub in ("taskframe", "celery", "app"):
        try:
            submodule = importlib.import_module(f"{module.__name__}.{sub}")
        except ModuleNotFoundError:
            continue
        return _app_in_module(submodule)
    raise ImproperlyConfigured(
        f"no app found in module {module.__name__!r}: name it 'app' or pass -A module:name"
    )


class Context:
    """What the group options leave for the subcommands."""

    def __init__(self, app_spec: str | None, broker: str | None, backend: str | None) -> None:
        self.app_spec = app_spec
        self.broker = broker
        self.backend = backend
        self._app: Taskframe | None = None

    @property
    def app(self) -> Taskframe:
        """The app named by ``-A`` (or a bare app when none was given)."""
        if self._app is None:
            try:
                app = find_app(self.app_spec) if self.app_spec else Taskframe("taskframe")
            except ImproperlyConfigured as exc:
                fail(str(exc))
            except ImportError as exc:
                fail(f"cannot import -A {self.app_spec}: {exc}")
            if self.broker:
                app.conf.broker_url = self.broker
            if self.backend:
                app.conf.result_backend = self.backend
            self._app = app
        return self._app


pass_ctx = click.make_pass_decorator(Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-A", "--app", "app_spec", envvar="TASKFRAME_APP", metavar="MODULE[:ATTR]",
              help="The app: proj, proj.app, proj:app or proj:create_app (a factory).")
@click.option("-b", "--broker", envvar="TASKFRAME_BROKER_URL", help="Broker URL (broker_url).")
@click.option("--result-backend", envvar="TASKFRAME_RESULT_BACKEND",
              help="Result backend URL (result_backend).")
@click.option("--workdir", type=click.Path(file_okay=False), help="Change to this directory first.")
@click.version_option(__version__, prog_name="taskframe")
@click.pass_context
def main(ctx: click.Context, app_spec: str | None, broker: str | None,
         result_backend: str | None, workdir: str | None) -> None:
    """taskframe: a Celery-compatible distributed task framework."""
    if workdir:
        os.chdir(workdir)
    if ctx.invoked_subcommand != "worker":
        # Client commands answer with one line: retry chatter stays out of it (restored on
        # exit, for callers that run the CLI in-process).
        tf_logger = logging.getLogger("taskframe")
        previous = tf_logger.level
        tf_logger.setLevel(logging.ERROR)
        ctx.call_on_close(lambda: tf_logger.setLevel(previous))
    ctx.obj = Context(app_spec, broker, result_backend)


@main.command()
@click.option("-P", "--pool", type=click.Choice(sorted(POOLS)),
              help="Pool implementation. gevent and eventlet are chosen here, not by "
              "worker_pool: the command monkey-patches for them before importing anything.")
@click.option("-c", "--concurrency", type=click.IntRange(min=1), help="Number of pool slots.")
@click.option("-Q", "--queues", help="Comma-separated queues to consume.")
@click.option("-X", "--exclude-queues", help="Comma-separated queues not to consume.")
@click.option("-n", "--hostname", help="Node name; %h = host name. Default taskframe@%h.")
@click.option("-l", "--loglevel", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
                                case_sensitive=False))
@click.option("-f", "--logfile", help="Log to this file instead of stderr.")
@click.option("--prefetch-multiplier", type=click.IntRange(min=0),
              help="Messages reserved per slot (0 = unlimited).")
@click.option("--disable-prefetch", is_flag=True, help="Reserve a message only for a free slot.")
@click.option("-O", "optimization", type=click.Choice(["default", "fair"]), default="default",
              help="Accepted for Celery compatibility: every taskframe pool hands a task only "
              "to a free slot, which is what Celery's -O fair does for prefork.")
@click.option("--soft-shutdown-timeout", type=float,
              help="Seconds running tasks get at warm shutdown (default: no limit).")
@click.option("--time-limit", type=click.FloatRange(min=0, min_open=True),
              help="Hard time limit of every task, seconds (task_time_limit; prefork).")
@click.option("--soft-time-limit", type=click.FloatRange(min=0, min_open=True),
              help="Soft time limit of every task, seconds (task_soft_time_limit).")
@click.option("--max-tasks-per-child", type=click.IntRange(min=1),
              help="Replace a prefork child after this many tasks.")
@click.option("--max-memory-per-child", type=click.IntRange(min=1),
              help="Replace a prefork child after a task leaves it above this RSS, in KiB.")
@worker_event_options
@worker_control_options
@pass_ctx
def worker(ctx: Context, pool: str | None, concurrency: int | None, queues: str | None,
           exclude_queues: str | None, hostname: str | None, loglevel: str, logfile: str | None,
           prefetch_multiplier: int | None, disable_prefetch: bool, optimization: str,
           soft_shutdown_timeout: float | None, time_limit: float | None = None,
           soft_time_limit: float | None = None, max_tasks_per_child: int | None = None,
           max_memory_per_child: int | None = None) -> None:
    """Start a worker."""
    from taskframe.pools import get_pool_class
    from taskframe.worker.worker import Worker

    app = ctx.app
    if disable_prefetch:
        app.conf.worker_disable_prefetch = True
    if soft_shutdown_timeout is not None:
        app.conf.worker_soft_shutdown_timeout = soft_shutdown_timeout
    for name, value in (("task_time_limit", time_limit),
                        ("task_soft_time_limit", soft_time_limit),
                        ("worker_max_tasks_per_child", max_tasks_per_child),
                        ("worker_max_memory_per_child", max_memory_per_child)):
        if value is not None:
            setattr(app.conf, name, value)
    try:
        get_pool_class(pool or app.conf.worker_pool)
        node = Worker(app, hostname=hostname, pool=pool, concurrency=concurrency,
                      queues=_split(queues), exclude_queues=_split(exclude_queues),
                      loglevel=loglevel.upper(), logfile=logfile,
                      prefetch_multiplier=prefetch_multiplier)
        code = node.start()
    except (ImproperlyConfigured, TransportError) as exc:
        fail(str(exc), EX_UNAVAILABLE if isinstance(exc, TransportError) else EX_USAGE)
    sys.exit(code)


@main.command()
@click.argument("name")
@click.option("-a", "--args", "args_json", default="[]", help="Positional arguments as JSON.")
@click.option("-k", "--kwargs", "kwargs_json", default="{}", help="Keyword arguments as JSON.")
@click.option("--countdown", type=float, help="Run no sooner than this many seconds from now.")
@click.option("--expires", type=float, help="Do not run after this many seconds from now.")
@click.option("-Q", "--queue", help="Send to this queue.")
@click.option("--wait", is_flag=True, help="Wait for the result and print it.")
@click.option("--timeout", type=float, default=None, help="With --wait: give up after seconds.")
@pass_ctx
def call(ctx: Context, name: str, args_json: str, kwargs_json: str, countdown: float | None,
         expires: float | None, queue: str | None, wait: bool, timeout: float | None) -> None:
    """Send task NAME and print its id (and its result with --wait)."""
    args = _json_arg(args_json, list, "--args")
    kwargs = _json_arg(kwargs_json, dict, "--kwargs")
    options: dict[str, Any] = {"countdown": countdown, "expires": expires}
    if queue:
        options["queue"] = queue
    try:
        result = ctx.app.send_task(name, args, kwargs, **options)
        click.echo(result.id)
        value = result.get(timeout=timeout, propagate=False) if wait else None
    except TimeoutError as exc:
        fail(str(exc), EX_TEMPFAIL)
    except (TaskframeError, TransportError) as exc:
        fail(f"{type(exc).__name__}: {exc}", EX_UNAVAILABLE)
    if wait:
        _echo_result(value)


@main.command()
@click.argument("task_id")
@click.option("--traceback", "show_traceback", is_flag=True, help="Print the traceback instead.")
@click.option("--timeout", type=float, default=None, help="Wait at most this many seconds.")
@pass_ctx
def result(ctx: Context, task_id: str, show_traceback: bool, timeout: float | None) -> None:
    """Print the result of TASK_ID (waiting for it)."""
    handle = ctx.app.AsyncResult(task_id)
    try:
        if show_traceback:
            click.echo(handle.traceback or "")
            return
        value = handle.get(timeout=timeout, propagate=False)
    except TimeoutError as exc:
        fail(str(exc), EX_TEMPFAIL)
    except (TaskframeError, TransportError) as exc:
        fail(str(exc), EX_UNAVAILABLE)
    _echo_result(value)


def _echo_result(value: Any) -> None:
    """Print a task's value as JSON, or its exception as ``Type: message`` (exit 1)."""
    if isinstance(value, BaseException):
        click.echo(f"{type(value).__name__}: {value}", err=True)
        sys.exit(EX_FAILURE)
    click.echo(json.dumps(value, default=repr))


@main.command()
@click.option("-Q", "--queues", help="Comma-separated queues (default: every configured queue).")
@click.option("-X", "--exclude-queues", help="Comma-separated queues to leave alone.")
@click.option("-f", "--force", is_flag=True, help="Do not ask for confirmation.")
@pass_ctx
def purge(ctx: Context, queues: str | None, exclude_queues: str | None, force: bool) -> None:
    """Delete the messages ready in the queues.

    Messages held by running workers and delayed (countdown/ETA) messages are kept.
    """
    app = ctx.app
    names = _split(queues) or list(app.router.queues)
    names = [n for n in names if n not in set(_split(exclude_queues) or ())]
    if not force:
        click.confirm(f"Delete all messages in {', '.join(names)}? This cannot be undone",
                      abort=True)
    try:
        with app.connection() as conn:
            conn.ensure_connection(max_retries=0)
            total = sum(conn.transport.purge(n) for n in names)
    except TransportError as exc:
        fail(str(exc), EX_UNAVAILABLE)
    click.echo(f"Purged {total} message{'s' if total != 1 else ''} from "
               f"{len(names)} queue{'s' if len(names) != 1 else ''}.")


@main.command()
@pass_ctx
def cleanup(ctx: Context) -> None:
    """Delete stored results older than result_expires."""
    try:
        removed = ctx.app.backend.cleanup()
    except (TaskframeError, TransportError) as exc:
        fail(f"{type(exc).__name__}: {exc}", EX_UNAVAILABLE)
    click.echo(f"Deleted {removed} expired result{'s' if removed != 1 else ''}.")


main.add_command(events_command)
for _command in (inspect_command, control_command, revoke_command, status_command):
    main.add_command(_command)


def _split(value: str | None) -> list[str] | None:
    if not value:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def _json_arg(text: str, kind: type, flag: str) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        fail(f"{flag} is not valid JSON: {exc}")
    if not isinstance(value, kind):
        fail(f"{flag} must be a JSON {'array' if kind is list else 'object'}")
    return value
