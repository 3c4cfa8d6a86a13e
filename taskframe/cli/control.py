"""The command-line parts of remote control: ``inspect``, ``control``, ``revoke``, ``status``.

::

    taskframe -A proj inspect active [-d w1@host] [--timeout 2] [--json]
    taskframe -A proj control rate_limit proj.add 10/m
    taskframe -A proj revoke ID [ID...] [--terminate] [--signal SIGKILL]
    taskframe -A proj status

People get one block per node; scripts get ``--json`` (``{node: reply}``). The
exit code is non-zero when no node replied (``revoke`` still exits 0 when the
ids were recorded for workers that start later). ``worker_control_options``
adds ``--statedb`` and ``--without-remote-control`` to ``taskframe worker``.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

import click

from taskframe.control.client import flatten_replies
from taskframe.control_server.handlers import HANDLERS

__all__ = ["control_command", "inspect_command", "revoke_command", "status_command",
           "worker_control_options"]

F = TypeVar("F", bound=Callable[..., Any])

EX_OK = 0
EX_USAGE = 64
EX_UNAVAILABLE = 69

_HIDDEN = {"hello"}


def _app() -> Any:
    """The app of the running ``taskframe`` command (``taskframe.cli.Context.app``)."""
    return click.get_current_context().find_root().obj.app


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def worker_control_options(fn: F) -> F:
    """Add ``--statedb`` and ``--without-remote-control`` to the ``worker`` command."""

    @click.option("-S", "--statedb", type=click.Path(dir_okay=False),
                  help="Keep the revoked task ids in this file across restarts "
                  "(worker_state_db).")
    @click.option("--without-remote-control", is_flag=True,
                  help="Do not answer inspect/control commands (worker_enable_remote_control).")
    @functools.wraps(fn)
    def wrapper(*args: Any, statedb: str | None, without_remote_control: bool,
                **kwargs: Any) -> Any:
        conf = _app().conf
        if statedb:
            conf.worker_state_db = statedb
        if without_remote_control:
            conf.worker_enable_remote_control = False
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _names(kind: str) -> list[str]:
    return sorted(n for n, h in HANDLERS.items() if h.kind == kind and n not in _HIDDEN)


def _arguments(method: str, values: Sequence[str]) -> dict[str, Any]:
    """Positional CLI words as the command's arguments (the last one takes the rest)."""
    names = HANDLERS[method].args
    if method == "revoke_by_stamped_headers":
        headers: dict[str, Any] = {}
        for word in values:
            key, sep, value = word.partition("=")
            if not sep:
                _fail(f"stamped header {word!r} is not key=value", EX_USAGE)
            headers.setdefault(key, []).append(value)
        return {"headers": headers}
    out: dict[str, Any] = {}
    for i, name in enumerate(names):
        if i >= len(values):
            break
        if name in ("task_id", "ids", "taskinfoitems") and i == len(names) - 1:
            out[name] = list(values[i:])
            break
        out[name] = _word(name, values[i])
    if len(values) > len(names) and names and names[-1] not in ("task_id", "ids",
                                                                 "taskinfoitems"):
        _fail(f"{method} takes at most {len(names)} argument(s): {' '.join(names)}", EX_USAGE)
    return out


def _word(name: str, value: str) -> Any:
    try:
        if name == "n":
            return int(value)
        if name in ("soft", "hard"):
            return None if value.lower() in ("none", "") else float(value)
    except ValueError:
        _fail(f"{name} must be a number, not {value!r}", EX_USAGE)
    if name == "with_defaults":
        return value.lower() in ("1", "true", "yes")
    return value


def _destination(value: str | None) -> list[str] | None:
    if not value:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def _call(method: str, arguments: dict[str, Any], destination: list[str] | None,
          timeout: float, reply: bool = True) -> dict[str, Any]:
    from taskframe.transport.errors import TransportError

    try:
        replies = _app().control.broadcast(method, arguments, destination=destination,
                                           reply=reply, timeout=timeout)
    except TransportError as exc:
        _fail(f"cannot reach the broker: {exc}", EX_UNAVAILABLE)
    return flatten_replies(replies)


def _show(replies: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(replies, default=repr, sort_keys=True))
        return
    for node in sorted(replies):
        value = replies[node]
        if isinstance(value, dict) and set(value) == {"ok"}:
            click.echo(f"->  {node}: OK")
            _indented(value["ok"])
        elif isinstance(value, dict) and set(value) == {"error"}:
            click.echo(f"->  {node}: ERROR")
            _indented(value["error"])
        elif isinstance(value, list):
            click.echo(f"->  {node}: OK")
            if not value:
                click.echo("    - empty -")
            for item in value:
                _item(item)
        else:
            click.echo(f"->  {node}: OK")
            _indented(value)
    count = len(replies)
    click.echo(f"\n{count} node{'s' if count != 1 else ''} online.", err=True)


def _indented(value: Any) -> None:
    text = value if isinstance(value, str) else json.dumps(value, indent=4, sort_keys=True,
                                                           default=repr)
    for line in str(text).splitlines() or [""]:
        click.echo(f"        {line}")


def _item(item: Any) -> None:
    request = item.get("request") if isinstance(item, dict) and "request" in item else item
    if isinstance(request, dict) and "id" in request:
        extra = f" eta={item['eta']}" if request is not item else ""
        click.echo(f"    * {request.get('name')}[{request.get('id')}] args={request.get('args')}"
                   f" kwargs={request.get('kwargs')}{extra}")
    elif isinstance(item, dict) and "name" in item:
        click.echo(f"    * {item['name']} (exchange={item.get('exchange', {}).get('name')!r}, "
                   f"routing_key={item.get('routing_key')!r})")
    else:
        click.echo(f"    * {item}")


def _done(replies: dict[str, Any]) -> None:
    if not replies:
        _fail("No nodes replied within time constraint.", EX_UNAVAILABLE)


_COMMON = [
    click.option("-d", "--destination", help="Comma-separated node names (default: all)."),
    click.option("-t", "--timeout", type=float, default=1.0, show_default=True,
                 help="Seconds to wait for replies."),
    click.option("-j", "--json", "as_json", is_flag=True, help="Print the replies as JSON."),
]


def _common(fn: F) -> F:
    for option in reversed(_COMMON):
        fn = option(fn)
    return fn


@click.command("inspect")
@click.argument("method", type=click.Choice(_names("inspect")), metavar="COMMAND")
@click.argument("values", nargs=-1)
@_common
def inspect_command(method: str, values: tuple[str, ...], destination: str | None,
                    timeout: float, as_json: bool) -> None:
    """Ask workers: ping, active, reserved, scheduled, revoked, registered, stats,
    active_queues, conf, query_task ID..., clock, report."""
    replies = _call(method, _arguments(method, values), _destination(destination), timeout)
    _show(replies, as_json)
    _done(replies)


@click.command("control")
@click.argument("method", type=click.Choice(_names("control")), metavar="COMMAND")
@click.argument("values", nargs=-1)
@_common
def control_command(method: str, values: tuple[str, ...], destination: str | None,
                    timeout: float, as_json: bool) -> None:
    """Steer workers: revoke ID..., terminate SIGNAL ID..., rate_limit TASK RATE,
    time_limit TASK SOFT HARD, add_consumer QUEUE, cancel_consumer QUEUE, pool_grow N,
    pool_shrink N, shutdown, enable_events, disable_events, heartbeat,
    revoke_by_stamped_headers KEY=VALUE..."""
    arguments = _arguments(method, values)
    if method in ("revoke", "terminate"):
        if not arguments.get("task_id"):
            _fail(f"{method} needs at least one task id", EX_USAGE)
        _app().control.remember_revoked(arguments["task_id"])
    if method == "shutdown":
        _call(method, arguments, _destination(destination), timeout, reply=False)
        click.echo("shutdown sent.", err=True)
        return
    replies = _call(method, arguments, _destination(destination), timeout)
    _show(replies, as_json)
    _done(replies)


@click.command("revoke")
@click.argument("task_ids", nargs=-1, required=True)
@click.option("--terminate", is_flag=True, help="Also stop the tasks if they run now.")
@click.option("-s", "--signal", "signal_name", default="SIGTERM", show_default=True,
              help="Signal for --terminate (threads/solo tasks see should_abort()).")
@_common
def revoke_command(task_ids: tuple[str, ...], terminate: bool, signal_name: str,
                   destination: str | None, timeout: float, as_json: bool) -> None:
    """Revoke TASK_IDS on the workers running now and on those started later."""
    app = _app()
    app.control.remember_revoked(list(task_ids))
    replies = _call("revoke", {"task_id": list(task_ids), "terminate": terminate,
                               "signal": signal_name}, _destination(destination), timeout)
    _show(replies, as_json)
    if not replies:
        if app.result_backend_url is None:
            _fail("No nodes replied, and without a result backend the revoke is not "
                  "kept for workers that start later.", EX_UNAVAILABLE)
        click.echo("No nodes replied; the revoke is kept in the result backend for workers "
                   "that start later.", err=True)


@click.command("status")
@_common
def status_command(destination: str | None, timeout: float, as_json: bool) -> None:
    """List the workers that answer a ping."""
    replies = _call("ping", {}, _destination(destination), timeout)
    if as_json:
        click.echo(json.dumps(replies, sort_keys=True))
    else:
        for node in sorted(replies):
            ok = isinstance(replies[node], dict) and replies[node].get("ok") == "pong"
            click.echo(f"{node}: {'OK' if ok else 'ERROR ' + repr(replies[node])}")
        count = len(replies)
        click.echo(f"\n{count} node{'s' if count != 1 else ''} online.")
    _done(replies)
