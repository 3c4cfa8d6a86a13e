"""Celery 5.7 and taskframe share a Redis broker and a PostgreSQL result store, both directions.

* The real Celery client sends 500 tasks; a taskframe worker subprocess runs them; Celery reads
  the results.
* taskframe sends 500 tasks; a real Celery worker subprocess runs them; taskframe reads the
  results.

Both sides use one ``global_keyprefix`` (kombu's option, honoured by our transport) on the
shared Redis and unique result tables, deleted afterwards. The projects are
``t/integration/redisproj/rcproj.py`` (taskframe) and ``rcelery.py`` (Celery).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import services
import sqlalchemy as sa
from workers import stop_processes, watch

pytestmark = [pytest.mark.interop, pytest.mark.slow]

PROJ_DIR = Path(__file__).parent.parent / "integration" / "redisproj"
SEP = "\x06\x16"


class Shared:
    """The broker, result store and prefix both sides use, and the subprocesses started."""

    def __init__(self, tmp_path: Path) -> None:
        self.broker = services.redis_url()
        self.backend = services.postgres_url().replace("postgresql://", "db+postgresql://")
        self.prefix = f"tfi{uuid.uuid4().hex[:8]}."
        self.tmp_path = tmp_path
        self.env = {
            **os.environ,
            "RC_BROKER": self.broker,
            "RC_BACKEND": self.backend,
            "RC_PREFIX": self.prefix,
            "PYTHONPATH": os.pathsep.join([str(PROJ_DIR), os.environ.get("PYTHONPATH", "")]),
        }
        for key in ("RC_BROKER", "RC_BACKEND", "RC_PREFIX"):
            os.environ[key] = self.env[key]
        sys.path.insert(0, str(PROJ_DIR))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def start(self, *argv: str) -> subprocess.Popen[bytes]:
        log = self.tmp_path / f"worker{len(self.procs)}.log"
        proc = subprocess.Popen([sys.executable, "-m", *argv], env=self.env, cwd=PROJ_DIR,
                                stdout=log.open("wb"), stderr=subprocess.STDOUT)
        watch(proc, log)
        self.procs.append(proc)
        self.logs.append(log)
        return proc

    def log_text(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in self.logs)

    def stop(self) -> None:
        stop_processes(self.procs)
        for name in ("rcproj", "rcelery"):
            sys.modules.pop(name, None)
        if str(PROJ_DIR) in sys.path:
            sys.path.remove(str(PROJ_DIR))
        for key in ("RC_BROKER", "RC_BACKEND", "RC_PREFIX"):
            os.environ.pop(key, None)
        client = redis.Redis.from_url(self.broker)
        keys = list(client.scan_iter(match=f"{self.prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()
        engine = sa.create_engine(services.postgres_url().replace(
            "postgresql://", "postgresql+psycopg://"))
        with engine.begin() as conn:
            table = self.prefix.replace(".", "_")
            for name in ("taskmeta", "tasksetmeta"):
                conn.execute(sa.text(f'DROP TABLE IF EXISTS "{table}{name}"'))
        engine.dispose()


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[Shared]:
    s = Shared(tmp_path)
    yield s
    s.stop()


def test_celery_client_tasks_run_on_a_taskframe_worker(shared: Shared) -> None:
    import celery.result
    import rcelery

    client = rcelery.app
    try:
        results = [client.send_task("rcproj.add", (n, n)) for n in range(500)]
        # Celery keeps countdowns in the eta header; our worker hands it to the delayed set.
        later = client.send_task("rcproj.add", (1000, 1), countdown=4)
        # The message a Celery client left is kombu's envelope in kombu's list.
        raw = redis.Redis.from_url(shared.broker).lindex(shared.prefix + "celery", -1)
        assert raw is not None
        assert json.loads(raw)["properties"]["body_encoding"] == "base64"
        shared.start("taskframe", "-A", "rcproj", "worker", "-P", "threads", "-c", "4",
                     "-l", "INFO")
        values = celery.result.ResultSet(results).get(timeout=180, interval=0.2)
        assert values == [2 * n for n in range(500)], shared.log_text()
        assert later.get(timeout=60, interval=0.2) == 1001, shared.log_text()
    finally:
        client.close()


def test_taskframe_client_tasks_run_on_a_celery_worker(shared: Shared) -> None:
    import rcproj

    app = rcproj.app
    try:
        results = [rcproj.add.delay(n, 1) for n in range(500)]
        # Our publish wrote kombu's binding for the default queue, as Celery's declare does.
        client = redis.Redis.from_url(shared.broker)
        member = f"celery{SEP}{SEP}celery".encode()
        assert member in client.smembers(f"{shared.prefix}_kombu.binding.celery")
        shared.start("celery", "-A", "rcelery", "worker", "-P", "threads", "-c", "4",
                     "--without-mingle", "--without-gossip", "-l", "INFO")
        deadline = time.monotonic() + 180
        values: list[Any] = []
        for result in results:
            values.append(result.get(timeout=max(1.0, deadline - time.monotonic()),
                                     interval=0.1))
        assert values == [n + 1 for n in range(500)], shared.log_text()
        assert client.hlen(shared.prefix + "unacked") == 0
    finally:
        app.close()


def test_a_celery_worker_runs_a_message_carrying_failed_deliveries(shared: Shared) -> None:
    """Our count rides in the envelope's properties: kombu and Celery carry it and ignore it."""
    import rcproj

    from taskframe.transport import Queue
    from taskframe.transport.redis import RedisTransport

    app = rcproj.app
    try:
        result = rcproj.add.delay(20, 22)
        transport = RedisTransport(shared.broker, {"global_keyprefix": shared.prefix})
        transport.connect()
        try:
            transport.consume([Queue("celery")])
            deadline = time.monotonic() + 30
            messages: list[Any] = []
            while not messages and time.monotonic() < deadline:
                messages = transport.poll(0.5)
            [message] = messages
            message.requeue_failed()  # as our worker does when the child running it died
        finally:
            transport.close()
        client = redis.Redis.from_url(shared.broker)
        raw = json.loads(client.lindex(shared.prefix + "celery", 0) or b"{}")
        assert raw["properties"]["x-taskframe-failed-deliveries"] == 1
        shared.start("celery", "-A", "rcelery", "worker", "-P", "threads", "-c", "1",
                     "--without-mingle", "--without-gossip", "-l", "INFO")
        assert result.get(timeout=60, interval=0.1) == 42, shared.log_text()
        assert client.hlen(shared.prefix + "unacked") == 0
    finally:
        app.close()
