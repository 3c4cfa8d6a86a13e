"""Liveness for probes (Kubernetes): is the worker's consumer loop still making progress?

The consumer loop records the time of each turn (``progress()`` returns it,
``time.monotonic()`` seconds). The worker is *healthy* while the last turn is
less than ``timeout`` seconds (``worker_health_timeout``) old. A loop stuck in
a task that never yields, in a dead broker socket or in a deadlock stops
turning, and the probe sees it.

Two ways to tell, either or both:

* ``--health-file PATH``: the file is touched every ``interval`` seconds while
  healthy and removed once unhealthy or at shutdown. Probe with
  ``test $(( $(date +%s) - $(stat -c %Y PATH) )) -lt 30`` (an ``exec`` probe).
* ``--health-port PORT``: ``GET`` any path answers ``200`` with a JSON body
  while healthy, ``503`` once unhealthy (an ``httpGet`` probe). Port 0 picks a
  free port; ``port`` says which, and the worker logs it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

__all__ = ["HealthMonitor", "start_health"]

logger = logging.getLogger("taskframe.events.health")


class HealthMonitor:
    """Reports whether ``progress()`` is recent, through a file and/or an HTTP port.

    Args:
        progress: the ``time.monotonic()`` of the consumer loop's last turn.
        timeout: seconds without progress before the worker counts as unhealthy.
        path: the liveness file, or ``None``.
        port: the HTTP port (0: any free one), or ``None``.
        host: the address the HTTP server binds (all interfaces by default, for probes
            that come from outside the container).
        hostname: the node name shown in the HTTP answer.
    """

    def __init__(self, progress: Callable[[], float], *, timeout: float,
                 path: str | os.PathLike[str] | None = None, port: int | None = None,
                 host: str = "0.0.0.0", hostname: str = "") -> None:
        self.progress = progress
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

    def age(self) -> float:
        """Seconds since the consumer loop last made progress."""
        return max(0.0, time.monotonic() - self.progress())

    def healthy(self) -> bool:
        """True while the loop made progress within ``timeout`` seconds."""
        return self.age() < self.timeout

    def status(self) -> dict[str, Any]:
        """What the HTTP endpoint answers."""
        healthy = self.healthy()
        return {"status": "ok" if healthy else "stalled", "hostname": self.hostname,
                "seconds_since_progress": round(self.age(), 3), "timeout": self.timeout}

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
                logger.error("health: no progress for %.1f s: removing %s", self.age(),
                             self.path)
                self.path.unlink()
        except OSError as exc:
            logger.warning("health: cannot update %s: %s", self.path, exc)


def start_health(conf: Any, consumer: Any, hostname: str) -> HealthMonitor | None:
    """Start the worker's liveness reporting as configured; ``None`` when not asked for.

    ``consumer`` is the worker's ``Consumer``: its ``last_turn`` is the progress; while
    it is ``stopping`` (a warm shutdown waits for running tasks, the loop does not turn)
    the worker counts as healthy.

    Raises:
        ImproperlyConfigured: the health port cannot be bound.
    """
    path, port = conf.worker_health_file, conf.worker_health_port
    if not path and port is None:
        return None

    def progress() -> float:
        return time.monotonic() if consumer.stopping else float(consumer.last_turn)

    monitor = HealthMonitor(progress, timeout=float(conf.worker_health_timeout or 60.0),
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
