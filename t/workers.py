"""Real worker processes for tests: start, log, stop; and the test project imported here.

A test project is a module in a folder (``t/integration/workerproj/wproj.py``) configured from
environment variables; the test runs its workers as subprocesses and imports the same module
in-process as the client.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["InlineWorkers", "ProjectImport", "WorkerProcs", "read_lines", "stop_processes",
           "wait_until"]


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``predicate`` every 0.1 s; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def read_lines(path: Path) -> list[str]:
    """The lines of a record file (empty when it does not exist yet)."""
    return path.read_text().splitlines() if path.exists() else []


def stop_processes(procs: list[subprocess.Popen[bytes]], timeout: float = 60.0) -> list[int]:
    """SIGTERM every live process (a warm shutdown), wait, kill what is left; exit codes."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return [proc.returncode for proc in procs]


class ProjectImport:
    """Imports a test project module here with ``env`` set, and undoes it all on ``close()``."""

    def __init__(self, proj_dir: Path, module: str, env: Mapping[str, str]) -> None:
        self.proj_dir = proj_dir
        self.name = module
        self._saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        sys.path.insert(0, str(proj_dir))
        sys.modules.pop(module, None)
        self.module: ModuleType = importlib.import_module(module)

    def close(self) -> None:
        app = getattr(self.module, "app", None)
        if app is not None:
            app.close()
        sys.modules.pop(self.name, None)
        if str(self.proj_dir) in sys.path:
            sys.path.remove(str(self.proj_dir))
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class WorkerProcs:
    """``taskframe -A <module> worker`` subprocesses, each logging to a file in ``log_dir``."""

    def __init__(self, proj_dir: Path, module: str, env: Mapping[str, str], log_dir: Path,
                 command: list[str] | None = None) -> None:
        self.proj_dir = proj_dir
        self.module = module
        self.log_dir = log_dir
        self.command = command or [sys.executable, "-m", "taskframe", "-A", module, "worker"]
        self.env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join(
            [str(proj_dir), os.environ.get("PYTHONPATH", "")])}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def start(self, *args: str, new_session: bool = False) -> subprocess.Popen[bytes]:
        """Start one more worker with extra CLI ``args``; with ``new_session`` it leads a
        process group of its own (``os.killpg(proc.pid, ...)`` signals that group)."""
        n = len(self.procs)
        log = self.log_dir / f"worker{n}.log"
        proc = subprocess.Popen(
            [*self.command, "-l", "INFO", "-n", f"w{n}@%h", *args],
            env=self.env, cwd=self.proj_dir, stdout=log.open("wb"), stderr=subprocess.STDOUT,
            start_new_session=new_session,
        )
        self.procs.append(proc)
        self.logs.append(log)
        return proc

    def stop(self, timeout: float = 60.0) -> list[int]:
        """SIGTERM every live worker, wait (then kill); return their exit codes."""
        return stop_processes(self.procs, timeout)

    def log_text(self) -> str:
        """Every worker's log, for assertion messages."""
        return "\n".join(f"--- {p.name}\n{p.read_text()}" for p in self.logs if p.exists())


class InlineWorkers:
    """Workers running in threads of the test process (memory-broker tests).

    ``start(**options)`` builds a ``Worker`` for ``app`` (threads pool, two slots,
    no logging setup, no signal handlers unless given) and runs it in a daemon
    thread; ``stop_all()`` stops them all and fails if one does not stop.
    """

    def __init__(self, app: Any, **defaults: Any) -> None:
        self.app = app
        self.defaults = {"pool": "threads", "concurrency": 2, **defaults}
        self.started: list[tuple[Any, threading.Thread]] = []

    def start(self, **options: Any) -> Any:
        from taskframe.worker.worker import Worker

        worker = Worker(self.app, setup_logs=False, install_signal_handlers=False,
                        **{**self.defaults, **options})
        thread = threading.Thread(target=worker.start, daemon=True)
        thread.start()
        self.started.append((worker, thread))
        return worker

    def stop_all(self, timeout: float = 10.0) -> None:
        for worker, thread in self.started:
            worker.stop()
            thread.join(timeout)
            assert not thread.is_alive(), "worker did not stop"
        self.started.clear()
