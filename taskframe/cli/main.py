"""The ``taskframe`` command: parse options, build the objects, call them.

``taskframe -A proj worker|call|result|purge ...``. Errors in what the user gave
(a missing ``-A`` module, bad JSON) print one line and exit non-zero; no
tracebacks.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import click

from taskframe import __version__
from taskframe.cli.context import (
    EX_FAILURE,
    EX_OK,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_USAGE,
    Context,
    fail,
    find_app,
    pass_ctx,
    split_names,
)
from taskframe.cli.control import (
    control_command,
    inspect_command,
    revoke_command,
    status_command,
)
from taskframe.cli.events import events_command
from taskframe.cli.worker import worker
from taskframe.errors import TaskframeError, TimeoutError
from taskframe.transport.errors import TransportError

__all__ = ["EX_FAILURE", "EX_OK", "EX_UNAVAILABLE", "EX_USAGE", "find_app", "main"]

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


main.add_command(worker)


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
    names = split_names(queues) or list(app.router.queues)
    names = [n for n in names if n not in set(split_names(exclude_queues) or ())]
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


def _json_arg(text: str, kind: type, flag: str) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        fail(f"{flag} is not valid JSON: {exc}")
    if not isinstance(value, kind):
        fail(f"{flag} must be a JSON {'array' if kind is list else 'object'}")
    return value
