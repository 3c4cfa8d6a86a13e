"""Worker subprocesses of ``poolproj`` on the shared Redis (broker and results), for pool tests.

Each ``PoolFleet`` has its own key prefix (deleted on ``close()``) and record file.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path
from types import ModuleType

import services
from workers import ProjectImport, WorkerProcs, read_lines, wait_until

PROJ_DIR = Path(__file__).parent

__all__ = ["PROJ_DIR", "PoolFleet", "max_overlap"]


class PoolFleet:
    """The client (``poolproj`` imported here) and its worker subprocesses."""

    def __init__(self, tmp_path: Path) -> None:
        url = services.redis_url()
        self.prefix = f"tfpool{uuid.uuid4().hex[:8]}."
        self.record = tmp_path / "record.txt"
        env = {"POOLPROJ_BROKER": url, "POOLPROJ_BACKEND": url, "POOLPROJ_PREFIX": self.prefix,
               "POOLPROJ_RECORD": str(self.record)}
        self.workers = WorkerProcs(PROJ_DIR, "poolproj", env, tmp_path)
        for name in ("TASKFRAME_BROKER_URL", "TASKFRAME_RESULT_BACKEND"):
            self.workers.env.pop(name, None)
        self.project = ProjectImport(PROJ_DIR, "poolproj", env)

    @property
    def module(self) -> ModuleType:
        """``poolproj``, imported in the test process (the client side)."""
        return self.project.module

    def start(self, pool: str, *args: str) -> subprocess.Popen[bytes]:
        """Start a worker with ``-P pool`` and wait until it consumes."""
        proc = self.workers.start("-P", pool, *args)
        log = self.workers.logs[-1]

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"worker -P {pool} exited: {self.workers.log_text()}")
            return log.exists() and " ready." in log.read_text()

        wait_until(ready, 30, f"the -P {pool} worker to be ready")
        return proc

    def lines(self) -> list[str]:
        """The record file's lines."""
        return read_lines(self.record)

    def log_text(self) -> str:
        """Every worker's log."""
        return self.workers.log_text()

    def close(self) -> None:
        """Stop the workers, forget the project, delete the keys."""
        self.workers.stop()
        self.project.close()
        services.redis_delete_prefix(0, self.prefix)


def max_overlap(lines: list[str]) -> int:
    """The most runs in progress at one moment, from ``start n t``/``end n t`` lines."""
    events: list[tuple[float, int]] = []
    for line in lines:
        word, _, rest = line.partition(" ")
        if word in ("start", "end"):
            events.append((float(rest.split()[1]), 1 if word == "start" else -1))
    events.sort(key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak
