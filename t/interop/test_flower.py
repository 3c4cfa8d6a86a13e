"""Flower (the real package) lists a taskframe worker and one of its finished tasks.

Flower runs in a subprocess with the Celery twin of the test project (``cevproj``:
same broker, same events exchange) and serves its HTTP API on a Unix socket in the
test's temporary directory, so no TCP port is needed.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import services
from workers import ProjectImport, WorkerProcs, wait_until

pytestmark = [pytest.mark.interop, pytest.mark.redis]

PROJ_DIR = Path(__file__).resolve().parent.parent / "integration" / "eventsproj"


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP to a server listening on a Unix socket."""

    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=10)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(str(self.path))
        self.sock = sock


def _get(sock_path: Path, url: str) -> Any:
    conn = UnixHTTPConnection(sock_path)
    try:
        conn.request("GET", url)
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200, (response.status, body)
        return json.loads(body)
    finally:
        conn.close()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[ProjectImport, WorkerProcs, dict[str, str]]]:
    url = services.redis_url()
    exchange = f"tfflower-{uuid.uuid4().hex[:8]}"
    queue = f"tfflowerq-{uuid.uuid4().hex[:8]}"
    env = {"EVPROJ_BROKER": url, "EVPROJ_EXCHANGE": exchange, "EVPROJ_QUEUE": queue}
    project = ProjectImport(PROJ_DIR, "evproj", env)
    workers = WorkerProcs(PROJ_DIR, "evproj", env, tmp_path)
    yield project, workers, env
    workers.stop()
    project.close()
    services.redis_delete_prefix(0, f"_kombu.binding.{exchange}")
    services.redis_delete_prefix(0, queue)


def test_flower_lists_taskframe_worker_and_its_task(
        fleet: tuple[ProjectImport, WorkerProcs, dict[str, str]], tmp_path: Path) -> None:
    project, workers, env = fleet
    sock_path = tmp_path / "flower.sock"
    log = tmp_path / "flower.log"
    flower = subprocess.Popen(
        [sys.executable, "-m", "flower", "-A", "cevproj", "flower",
         f"--unix_socket={sock_path}", "--persistent=False", "--inspect_timeout=500"],
        env={**os.environ, **env, "PYTHONPATH": str(PROJ_DIR),
             "FLOWER_UNAUTHENTICATED_API": "true"},
        cwd=PROJ_DIR, stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )
    try:
        workers.start("-E", "--heartbeat-interval", "0.5")
        wait_until(lambda: flower.poll() is not None or sock_path.exists(), 30,
                   "Flower's socket")
        assert flower.poll() is None, log.read_text()

        def worker_listed() -> bool:
            status = _get(sock_path, "/api/workers?status=true")
            return any(name.startswith("w0@") and alive for name, alive in status.items())

        wait_until(worker_listed, 30, "Flower to list the taskframe worker")
        task_id = project.module.add.delay(20, 22).id

        def task_listed() -> bool:
            tasks = _get(sock_path, "/api/tasks")
            return tasks.get(task_id, {}).get("state") == "SUCCESS"

        try:
            wait_until(task_listed, 30, "Flower to list the finished task")
        except AssertionError:
            raise AssertionError(f"{log.read_text()}\n{workers.log_text()}") from None
        info = _get(sock_path, f"/api/task/info/{task_id}")
    finally:
        flower.terminate()
        flower.wait(30)
    assert info["name"] == "evproj.add"
    assert info["state"] == "SUCCESS"
    assert info["result"] == "42"
    assert info["worker"].startswith("w0@")
    assert info["args"] == "(20, 22)"
    assert isinstance(info["runtime"], float)
