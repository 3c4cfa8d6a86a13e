"""Liveness for probes (Kubernetes): is the worker still making progress?

What counts as progress, and as a stall, is ``watchdog.ProgressWatch``'s to say:
the consumer loop turns, and a pool that holds work starts or ends jobs (see
``taskframe.worker.watchdog``); ``worker_health_timeout`` seconds without it and
the worker is *stalled*. This module only tells the outside, from the
``Watchdog``'s last check (about every second):

* ``--health-file PATH``: the file is touched every ``interval`` seconds while
  healthy and removed once stalled or at shutdown. Probe with
  ``test $(( $(date +%s) - $(stat -c %Y PATH) )) -lt 30`` (an ``exec`` probe).
* ``--health-port PORT``: ``GET`` any path answers ``200`` with a JSON body
  while healthy, ``503`` once stalled (an ``httpGet`` probe), the body saying
  why. Port 0 picks a free port; ``port`` says which, and the worker logs it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from taskframe.worker.watchdog import Watchdog

__all__ = ["HealthMonitor", "start_health"]

logger = logging.getLogger("taskframe.events.health")


class HealthMonitor:
    """Reports what ``status()`` says through a file and/or an HTTP port.

    Args:
        status: ``Watchdog.status()``: a dict whose ``"status"`` is ``"ok"`` while the
            worker progresses (``"stalled"`` otherwise).
        timeout: seconds without progress before a stall (for the log lines).
        path: the liveness file, or ``None``.
        port: the HTTP port (0: any free one), or ``None``.
        host: the address the HTTP server binds (all interfaces by default, for probes
            that come from outside the container).
        hostname: the node name shown in the HTTP answer.
    """

    def __init__(self, status: Callable[[], dict[str, Any]], *, timeout: float,
                 path: str | os.PathLike[str] | None = None, port: int | None = None,
                 host: str = "0.0.0.0", hostname: str = "") -> None:
        self._status = status
        self.timeout = float(timeout)
        self.path = Path(path) if path is not None else None
        self.requested_port = port
        self.host = host
        self.hostname = hostname
        self.interval = max(0.1, min(1.0, self.timeout / 4))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._server: ThreadingHTTPServer | None = None

    @property
    def port(self) -> int | None:
        """The port the HTTP server listens on (``None`` when there is none)."""
        return None if self._server is None else int(self._server.server_address[1])

    def healthy(self) -> bool:
        """True while the worker progresses."""
        return bool(self._status().get("status") == "ok")

    def status(self) -> dict[str, Any]:
        """What the HTTP endpoint answers: the status, with this node's name."""
        return {**self._status(), "hostname": self.hostname}

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the HTTP server and the file toucher (those configured)."""
        if self.requested_port is not None:
            self._server = ThreadingHTTPServer((self.host, self.requested_port),
                                               _handler_for(self))
            self._server.daemon_threads = True
            threading.Thread(target=self._server.serve_forever, daemon=True,
                             name="taskframe-health-http").start()
            logger.info("health: serving on %s:%d (unhealthy after %.0f s without progress)",
                        self.host, self.port, self.timeout)
        if self.path is not None:
            self._update_file()
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name="taskframe-health-file")
            self._thread.start()
            logger.info("health: touching %s (unhealthy after %.0f s without progress)",
                        self.path, self.timeout)

    def stop(self) -> None:
        """Stop serving and remove the file."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._update_file()

    def _update_file(self) -> None:
        assert self.path is not None
        try:
            if self.healthy():
                self.path.touch()
            elif self.path.exists():
                logger.error("health: stalled (%s): removing %s", self._status().get("stall"),
                             self.path)
                self.path.unlink()
        except OSError as exc:
            logger.warning("health: cannot update %s: %s", self.path, exc)


def start_health(conf: Any, watchdog: Watchdog, hostname: str) -> HealthMonitor | None:
    """Start the worker's liveness reporting as configured; ``None`` when not asked for.

    Raises:
        ImproperlyConfigured: the health port cannot be bound.
    """
    path, port = conf.worker_health_file, conf.worker_health_port
    if not path and port is None:
        return None
    monitor = HealthMonitor(watchdog.status, timeout=watchdog.watch.timeout,
                            path=path or None, port=port, hostname=hostname)
    try:
        monitor.start()
    except OSError as exc:
        from taskframe.errors import ImproperlyConfigured

        monitor.stop()
        raise ImproperlyConfigured(f"cannot serve the health check on port {port}: {exc}") \
            from exc
    return monitor


def _handler_for(monitor: HealthMonitor) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status = monitor.status()
            body = json.dumps(status).encode()
            self.send_response(200 if status["status"] == "ok" else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_HEAD = do_GET

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug("health: " + format, *args)

    return Handler
