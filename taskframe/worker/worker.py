"""``Worker``: start, run and stop the parts of a worker, in plain visible order.

``start()``:
  logging -> import task modules -> ``worker_init`` -> connect to the broker
  (retrying as configured) -> event receivers -> pool -> events (``worker-online``,
  threads) -> consumer -> health check -> remote control -> signal handlers ->
  ``worker_ready`` -> watchdog -> the receive loop.

The watchdog (``taskframe.worker.watchdog``) checks about every second that the
consumer loop turns and that a pool holding work starts or ends jobs; remote
control (``inspect stats``) and the health check report what it saw. With
``worker_watchdog`` a stall starts a cold shutdown and the process exits with
``EX_WEDGED`` (75), within ``EXIT_GRACE`` seconds even if the shutdown hangs.

``stop`` (first SIGTERM/SIGINT, warm): stop taking messages, give back the
reserved ones, let running tasks finish and settle them, close. With
``worker_soft_shutdown_timeout``, tasks still running at the deadline are asked
to abort (``request.should_abort()`` turns true, ``abort_reason == "shutdown"``)
and get a few more seconds.
A second signal (cold): give back everything not settled and exit at once.
Nothing that did not run is ever acked.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

from taskframe import signals
from taskframe.control_server.worker_adapter import RemoteControl, load_revoked
from taskframe.errors import BrokerConnectionError, TransportError
from taskframe.events.worker_events import WorkerEvents
from taskframe.log import setup_logging
from taskframe.pools import get_pool_class
from taskframe.worker.consumer import Consumer
from taskframe.worker.health import HealthMonitor, start_health
from taskframe.worker.watchdog import EX_WEDGED, ProgressWatch, Stall, Watchdog

if TYPE_CHECKING:
    from taskframe.client.app import Taskframe
    from taskframe.transport import Queue

__all__ = ["EX_COLD_SHUTDOWN", "EX_OK", "EX_SOFTWARE", "EX_UNAVAILABLE", "EX_WEDGED", "Worker",
           "expand_hostname"]

logger = logging.getLogger("taskframe.worker")

EX_OK = 0
EX_COLD_SHUTDOWN = 1
EX_SOFTWARE = 70
EX_UNAVAILABLE = 69

# Seconds tasks asked to abort (soft shutdown deadline) get before the cold shutdown.
ABORT_GRACE = 5.0


def expand_hostname(template: str | None) -> str:
    """``-n`` expansion: ``%h`` host, ``%n`` its first label, ``%d`` its domain."""
    host = socket.gethostname()
    name, _, domain = host.partition(".")
    template = template or "taskframe@%h"
    return template.replace("%h", host).replace("%n", name).replace("%d", domain)


class Worker:
    """One worker process: consumes ``queues`` and runs tasks in a pool.

    Args:
        app: the app whose tasks run here.
        hostname: the node name (``-n``), ``%h`` expanded.
        pool: ``-P`` name (``solo`` or ``threads`` in this version).
        concurrency: ``-c``; defaults to ``worker_concurrency`` or the CPU count.
        queues: names to consume (``-Q``); defaults to every queue in ``task_queues``
            (or ``task_default_queue``).
        loglevel: ``-l``.
        install_signal_handlers: handle SIGTERM/SIGINT (main thread only).
    """

    def __init__(
        self,
        app: Taskframe,
        *,
        hostname: str | None = None,
        pool: str | None = None,
        concurrency: int | None = None,
        queues: Sequence[str] | None = None,
        exclude_queues: Sequence[str] | None = None,
        loglevel: str | int = "INFO",
        prefetch_multiplier: int | None = None,
        logfile: str | None = None,
        setup_logs: bool = True,
        install_signal_handlers: bool = True,
    ) -> None:
        conf = app.conf
        self.app = app
        self.hostname = expand_hostname(hostname)
        self.pool_name = pool or conf.worker_pool
        self.concurrency = concurrency or conf.worker_concurrency or os.cpu_count() or 1
        if self.pool_name == "solo":
            self.concurrency = 1
        self.queue_names = list(queues or [])
        self.exclude_queues = set(exclude_queues or ())
        self.loglevel = loglevel
        self.logfile = logfile
        self.setup_logs = setup_logs
        multiplier = conf.worker_prefetch_multiplier if prefetch_multiplier is None \
            else prefetch_multiplier
        self.prefetch_count = 0 if multiplier == 0 else int(multiplier) * self.concurrency
        if conf.worker_disable_prefetch:
            self.prefetch_count = self.concurrency
        self.install_signal_handlers = install_signal_handlers
        self.consumer: Consumer | None = None
        self.events: WorkerEvents | None = None
        self.health: HealthMonitor | None = None
        self.watchdog: Watchdog | None = None
        self.remote: RemoteControl | None = None
        self._cold = threading.Event()
        self._signals_seen = 0
        self.exit_code = EX_OK

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> int:
        """Run until shut down; return the process exit code."""
        conf = self.app.conf
        if self.setup_logs:
            setup_logging(self.loglevel, hijack_root=bool(conf.worker_hijack_root_logger),
                          fmt=conf.worker_log_format, task_fmt=conf.worker_task_log_format,
                          logfile=self.logfile)
        self.app.import_modules()
        self.app.origin = self.hostname
        signals.worker_init.send(sender=self)
        connection = self.app.connection(conf.broker_read_url or None)
        if not self._connect(connection):
            return EX_UNAVAILABLE
        # The receivers before the pool (forked pool children inherit them), the event
        # threads after it: a prefork pool forks its fork server while this process runs
        # one thread (a lock another thread held then would stay held in every child).
        self.events = WorkerEvents(self.app, self.hostname, self._event_numbers)
        self.events.prepare()
        pool = get_pool_class(self.pool_name)(self.concurrency, app=self.app)
        pool.start()
        self.events.start()
        try:
            pool.run_hooks(self.app.worker_start_hooks)
        except Exception as exc:
            logger.critical("a worker start hook failed: %r. Exiting.", exc, exc_info=exc)
            self.events.stop()
            pool.stop(wait=False, timeout=1.0)
            connection.close()
            return EX_SOFTWARE
        self.consumer = Consumer(self.app, connection, self.queues(), pool,
                                 hostname=self.hostname, prefetch_count=self.prefetch_count)
        revoked, statedb, store = load_revoked(self.app, conf.worker_state_db)
        self.consumer.revoked = revoked
        try:
            self.watchdog = self._watchdog(self.consumer)
            self.health = start_health(self.app.conf, self.watchdog, self.hostname)
            self.consumer.start_consuming()
            self.remote = RemoteControl.start(self, self.consumer, revoked=revoked,
                                              statedb=statedb, store=store, events=self.events,
                                              health=self.watchdog.status)
            if self.install_signal_handlers:
                self._install_signal_handlers()
            self._log_banner(connection.safe_url())
            signals.worker_ready.send(sender=self)
            self.watchdog.start()  # here: a slow start is no stall of the loop
            self.consumer.run()
        except BrokerConnectionError as exc:
            logger.critical("Lost the broker and could not reconnect: %s. Exiting.", exc)
            self.exit_code = EX_UNAVAILABLE
        finally:
            self._shutdown(pool, connection)
        return self.exit_code

    def _connect(self, connection: Any) -> bool:
        """Connect to the broker, retrying as configured; False (logged) when it gave up."""
        conf = self.app.conf
        max_retries = conf.broker_connection_max_retries \
            if conf.broker_connection_retry_on_startup else 0
        try:
            connection.ensure_connection(
                max_retries=max_retries,
                on_error=lambda exc, wait: logger.error(
                    "Cannot connect to %s: %s. Trying again in %.1f s",
                    connection.safe_url(), exc, wait),
            )
        except BrokerConnectionError as exc:
            logger.critical("Cannot connect to the broker %s: %s. Giving up.",
                            connection.safe_url(), exc)
            return False
        return True

    def _watchdog(self, consumer: Consumer) -> Watchdog:
        conf = self.app.conf
        watch = ProgressWatch(consumer, float(conf.worker_health_timeout or 60.0))
        return Watchdog(watch, on_stall=self._on_stall if conf.worker_watchdog else None)

    def _on_stall(self, stall: Stall) -> None:
        """``worker_watchdog``: the worker is wedged; a cold shutdown, and a non-zero exit
        so that the service manager starts another (the watchdog thread logged why)."""
        self.exit_code = EX_WEDGED
        self.stop(cold=True)

    def queues(self) -> list[Queue]:
        """The queues to consume."""
        router = self.app.router
        names = self.queue_names or list(router.queues)
        return [router.queue(n) for n in names if n not in self.exclude_queues]

    def stop(self, *, cold: bool = False) -> None:
        """Ask for a warm (or cold) shutdown; safe from any thread."""
        if cold:
            self._cold.set()
        if self.consumer is not None:
            self.consumer.stop()

    def _shutdown(self, pool: Any, connection: Any) -> None:
        consumer = self.consumer
        assert consumer is not None
        consumer.stop()
        logger.info("%s: shutting down (%s).", self.hostname,
                    "cold" if self._cold.is_set() else "warm")
        try:
            for q in consumer.queues:
                connection.transport.cancel(q.name)
            given_back = consumer.give_back_reserved()
            if given_back:
                logger.info("gave back %d reserved message(s) to the broker", given_back)
            timeout = float(self.app.conf.worker_soft_shutdown_timeout or 0) or None
            deadline = None if timeout is None else time.monotonic() + timeout
            finished = consumer.wait_for_running(deadline, self._cold)
            if not finished:
                # Ask running tasks to stop (request.should_abort()), give them a moment.
                asked = consumer.abort_running("shutdown")
                logger.warning("asked %d running task(s) to abort", asked)
                if not self._cold.is_set():
                    finished = consumer.wait_for_running(
                        time.monotonic() + ABORT_GRACE, self._cold)
            if not finished and self.exit_code == EX_OK:
                self.exit_code = EX_COLD_SHUTDOWN
            if not finished:
                logger.warning("cold shutdown: %d running task(s) not finished; their "
                               "unacked messages go back to the broker", consumer.running)
        except TransportError as exc:
            logger.error("broker error during shutdown: %s", exc)
        try:
            pool.run_hooks(self.app.worker_stop_hooks)
        except Exception as exc:
            logger.error("a worker stop hook failed: %r", exc, exc_info=exc)
        if self.remote is not None:
            self.remote.stop()  # answered inspect/control during the warm shutdown
        pool.stop(wait=not self._cold.is_set(), timeout=1.0)
        if self.health is not None:
            self.health.stop()
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.events is not None:
            self.events.stop()  # worker-offline, after the last task events
        connection.close()
        signals.worker_shutdown.send(sender=self)
        # Broker connections only: the app (and its backend) may live on in this process.
        self.app.close(backend=False)

    def _event_numbers(self) -> tuple[int, int]:
        """``(active, processed)`` for the worker events."""
        consumer = self.consumer
        return (0, 0) if consumer is None else (len(consumer.active), consumer.processed)

    # -- signals and banner -------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        # signal.signal checks the OS thread itself; threading.main_thread() does not
        # match the main thread under eventlet's monkey patching.
        try:
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
        except ValueError:  # not the main thread: the embedding program handles signals
            return

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals_seen += 1
        name = signal.Signals(signum).name
        if self._signals_seen == 1:
            logger.warning("%s received: warm shutdown (send it again for a cold one)", name)
            self.stop()
        else:
            logger.warning("%s received again: cold shutdown", name)
            self.stop(cold=True)

    def _log_banner(self, url: str) -> None:
        tasks = sorted(n for n in self.app.tasks if not n.startswith("celery."))
        logger.info(
            "%s ready. broker: %s, results: %s, pool: %s (concurrency %d), prefetch: %s, "
            "queues: %s", self.hostname, url, _safe(self.app.result_backend_url),
            self.pool_name, self.concurrency, self.prefetch_count or "unlimited",
            ", ".join(q.name for q in self.queues()),
        )
        logger.info("tasks: %s", ", ".join(tasks) or "(none registered)")


def _safe(url: str | None) -> str:
    if not url:
        return "disabled"
    from taskframe.transport.url import safe_url

    return safe_url(url)
