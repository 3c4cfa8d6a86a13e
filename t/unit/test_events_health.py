"""``HealthMonitor``: the liveness file and HTTP endpoint follow the watchdog's verdict."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from workers import wait_until

from taskframe.worker.health import HealthMonitor


class Loop:
    """Stands for the watchdog's last check (``Watchdog.status``): stalled or not."""

    def __init__(self) -> None:
        self.stalled = False

    def turn(self) -> None:
        self.stalled = False

    def stall(self, seconds: float) -> None:
        self.stalled = True

    def status(self) -> dict[str, Any]:
        stall = {"kind": "loop", "seconds": 31.0, "detail": "no turn"} if self.stalled else None
        return {"status": "stalled" if self.stalled else "ok", "stall": stall}


def _get(port: int) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_http_endpoint_answers_503_once_the_loop_stalls() -> None:
    loop = Loop()
    monitor = HealthMonitor(loop.status, timeout=30, port=0, host="127.0.0.1",
                            hostname="w1@h")
    monitor.start()
    try:
        assert monitor.port
        status, body = _get(monitor.port)
        assert status == 200
        assert body["status"] == "ok" and body["hostname"] == "w1@h"
        loop.stall(31)
        status, body = _get(monitor.port)
        assert status == 503 and body["status"] == "stalled"
        assert body["stall"]["kind"] == "loop" and body["hostname"] == "w1@h"
        loop.turn()
        assert _get(monitor.port)[0] == 200
    finally:
        monitor.stop()


def test_file_is_touched_while_healthy_and_removed_when_stalled(tmp_path: Path) -> None:
    loop = Loop()
    path = tmp_path / "alive"
    monitor = HealthMonitor(loop.status, timeout=0.4, path=path)
    monitor.start()
    try:
        assert path.exists()
        path.touch()
        first = path.stat().st_mtime_ns
        wait_until(lambda: (loop.turn(), path.stat().st_mtime_ns > first)[1], 10,
                   "the file to be touched again")
        loop.stall(10)
        wait_until(lambda: not path.exists(), 10, "the file to be removed")
        loop.turn()
        wait_until(path.exists, 10, "the file to come back")
    finally:
        monitor.stop()
    assert not path.exists()
