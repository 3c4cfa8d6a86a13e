"""The command-line parts of events: ``taskframe events`` and the worker's event options.

``worker_event_options`` adds ``-E/--task-events``, ``--heartbeat-interval``,
``--without-heartbeat``, ``--health-file``, ``--health-port``,
``--health-timeout`` and ``--watchdog`` to ``taskframe worker``; they set the
matching settings on the app before the worker is built.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

__all__ = ["events_command", "worker_event_options"]

F = TypeVar("F", bound=Callable[..., Any])

logger = logging.getLogger("taskframe.events")

EX_OK = 0
EX_UNAVAILABLE = 69


def _app() -> Any:
    """The app of the running ``taskframe`` command (``taskframe.cli.Context.app``)."""
    return click.get_current_context().find_root().obj.app


def worker_event_options(fn: F) -> F:
    """Add the event and health options to the ``worker`` command."""

    @click.option("-E", "--task-events", "task_events", is_flag=True, default=None,
                  help="Send task events (worker_send_task_events), for Flower and "
                  "'taskframe events'.")
    @click.option("--heartbeat-interval", type=click.FloatRange(min=0.1),
                  help="Seconds between worker-heartbeat events (default 2).")
    @click.option("--without-heartbeat", is_flag=True, help="Send no worker-heartbeat events.")
    @click.option("--health-file", type=click.Path(dir_okay=False),
                  help="Touch this file while the worker makes progress; removed when it "
                  "stalls.")
    @click.option("--health-port", type=click.IntRange(min=0, max=65535),
                  help="Serve HTTP 200 while the worker makes progress, 503 when it "
                  "stalls (0: any free port, logged).")
    @click.option("--health-timeout", type=click.FloatRange(min=0.1),
                  help="Seconds without progress (the consumer loop turning, a pool that "
                  "holds work starting or ending jobs) before stalled (worker_health_timeout).")
    @click.option("--watchdog", is_flag=True, default=None,
                  help="Exit with code 75 once stalled, for systemd or Kubernetes to start "
                  "a new worker (worker_watchdog).")
    @functools.wraps(fn)
    def wrapper(*args: Any, task_events: bool | None, heartbeat_interval: float | None,
                without_heartbeat: bool, health_file: str | None, health_port: int | None,
                health_timeout: float | None, watchdog: bool | None, **kwargs: Any) -> Any:
        conf = _app().conf
        if task_events:
            conf.worker_send_task_events = True
        if heartbeat_interval is not None:
            conf.worker_heartbeat_interval = heartbeat_interval
        if without_heartbeat:
            conf.worker_heartbeat_interval = 0.0
        if health_file is not None:
            conf.worker_health_file = health_file
        if health_port is not None:
            conf.worker_health_port = health_port
        if health_timeout is not None:
            conf.worker_health_timeout = health_timeout
        if watchdog:
            conf.worker_watchdog = True
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _wake_workers(app: Any) -> None:
    """Ask every worker for a heartbeat now (the ``heartbeat`` command), as Celery's
    receivers do, so running workers show up at once instead of at their next beat."""
    try:
        app.control.heartbeat()
    except Exception as exc:  # best effort: the stream works without it
        logger.debug("events: could not wake the workers: %s", exc)


@click.command("events")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--timeout", type=float, default=None,
              help="Stop after this many seconds (default: run until interrupted).")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Stop after this many events.")
@click.option("--routing-key", default="#", show_default=True,
              help="Which events: '#' all, 'task.#' task events, 'worker.#' worker events.")
def events_command(as_json: bool, timeout: float | None, limit: int | None,
                   routing_key: str) -> None:
    """Print a live stream of events: time, hostname, type, task, state."""
    from taskframe.events.dispatcher import events_supported
    from taskframe.events.monitor import EventFormatter
    from taskframe.events.receiver import EventReceiver
    from taskframe.transport.errors import TransportError

    app = _app()
    url = app.conf.broker_read_url or app.broker_url
    if not events_supported(url):
        click.echo(f"Error: events travel over AMQP and Redis brokers, not "
                   f"{url.split('://', 1)[0]}://", err=True)
        sys.exit(EX_UNAVAILABLE)
    formatter = EventFormatter(as_json=as_json)
    receiver = EventReceiver.for_app(app, routing_key=routing_key)
    try:
        receiver.consume()
    except TransportError as exc:
        click.echo(f"Error: cannot receive events from {receiver.connection.safe_url()}: "
                   f"{exc}", err=True)
        sys.exit(EX_UNAVAILABLE)
    click.echo(f"-> receiving events from {receiver.connection.safe_url()} (Ctrl-C to stop)",
               err=True)
    _wake_workers(app)
    try:
        for event in receiver.itercapture(limit=limit, timeout=timeout):
            click.echo(formatter(event))
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    finally:
        receiver.close()
    sys.exit(EX_OK)
