"""``taskframe worker``: its options, and the ``Worker`` they build."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from taskframe.cli.context import EX_UNAVAILABLE, EX_USAGE, Context, fail, pass_ctx, split_names
from taskframe.cli.control import worker_control_options
from taskframe.cli.events import worker_event_options
from taskframe.errors import ImproperlyConfigured
from taskframe.pools import POOLS
from taskframe.transport.errors import TransportError

__all__ = ["worker"]

#: The worker's own options, outermost first (as decorators would be written).
_OPTIONS: list[Callable[[Any], Any]] = [
    click.option("-P", "--pool", type=click.Choice(sorted(POOLS)),
                 help="Pool implementation. gevent and eventlet are chosen here, not by "
                 "worker_pool: the command monkey-patches for them before importing anything."),
    click.option("-c", "--concurrency", type=click.IntRange(min=1), help="Number of pool slots."),
    click.option("-Q", "--queues", help="Comma-separated queues to consume."),
    click.option("-X", "--exclude-queues", help="Comma-separated queues not to consume."),
    click.option("-n", "--hostname", help="Node name; %h = host name. Default taskframe@%h."),
    click.option("-l", "--loglevel", default="INFO", show_default=True,
                 type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
                                   case_sensitive=False)),
    click.option("-f", "--logfile", help="Log to this file instead of stderr."),
    click.option("--prefetch-multiplier", type=click.IntRange(min=0),
                 help="Messages reserved per slot (0 = unlimited)."),
    click.option("--disable-prefetch", is_flag=True,
                 help="Reserve a message only for a free slot."),
    click.option("-O", "optimization", type=click.Choice(["default", "fair"]), default="default",
                 help="Accepted for Celery compatibility: every taskframe pool hands a task only "
                 "to a free slot, which is what Celery's -O fair does for prefork."),
    click.option("--soft-shutdown-timeout", type=float,
                 help="Seconds running tasks get at warm shutdown (default: no limit)."),
    click.option("--time-limit", type=click.FloatRange(min=0, min_open=True),
                 help="Hard time limit of every task, seconds (task_time_limit; prefork)."),
    click.option("--soft-time-limit", type=click.FloatRange(min=0, min_open=True),
                 help="Soft time limit of every task, seconds (task_soft_time_limit)."),
    click.option("--max-tasks-per-child", type=click.IntRange(min=1),
                 help="Replace a prefork child after this many tasks."),
    click.option("--max-memory-per-child", type=click.IntRange(min=1),
                 help="Replace a prefork child after a task leaves it above this RSS, in KiB."),
    worker_event_options,
    worker_control_options,
]


def _worker_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_OPTIONS):
        fn = option(fn)
    return fn


@click.command()
@_worker_options
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
                      queues=split_names(queues), exclude_queues=split_names(exclude_queues),
                      loglevel=loglevel.upper(), logfile=logfile,
                      prefetch_multiplier=prefetch_multiplier)
        code = node.start()
    except (ImproperlyConfigured, TransportError) as exc:
        fail(str(exc), EX_UNAVAILABLE if isinstance(exc, TransportError) else EX_USAGE)
    sys.exit(code)


