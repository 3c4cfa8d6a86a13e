"""Real worker processes for tests: start, log, stop, check; and the test project imported here.

A test project is a module in a folder (``t/integration/workerproj/wproj.py``) configured from
environment variables; the test runs its workers as subprocesses and imports the same module
in-process as the client.

Every worker process a test starts is *watched* (``WorkerProcs.start`` does it; other code
that starts a worker calls ``watch``): after the test, ``t/conftest.py`` fails it when a
watched worker ended with an exit code other than 0 or its log shows an exception that no
code handled (``unhandled_errors``). A test that kills a worker, or makes one exit non-zero
or fail on purpose, says so with ``expect(proc, exit_codes=..., why=...)`` (or the same
arguments to ``start``).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["InlineWorkers", "ProjectImport", "WorkerProcs", "audit_watched", "expect",
           "read_lines", "stop_processes", "unhandled_errors", "wait_until", "watch"]


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


# -- watching worker processes -----------------------------------------------------------

#: Lines of a worker's log that report an exception no code handled: Python's own reports
#: (``threading.excepthook``, ``sys.unraisablehook``, a fatal error, an asyncio task whose
#: exception nobody read), and taskframe's last-resort handlers, each of which stands for a
#: thread that would have died.
UNHANDLED = re.compile(
    r"^(?:Exception in thread |Exception ignored in|Fatal Python error|"
    r"Unhandled exception in thread )"
    r"|Task exception was never retrieved"
    r"|a turn of the consumer loop failed; going on"
    r"|prefork supervisor: a turn failed; going on"
    r"|job crashed in the thread pool"
    r"|watchdog: a check failed", re.MULTILINE)


def unhandled_errors(text: str) -> list[str]:
    """The lines of a worker log that show an unhandled exception (see ``UNHANDLED``).

    Tracebacks the worker logs with a record (a task's failure, a broker error) are not
    unhandled; an exception that ends the main thread shows in the exit code.
    """
    lines = []
    for match in UNHANDLED.finditer(text):
        start = text.rfind("\n", 0, match.start()) + 1
        end = text.find("\n", match.end())
        lines.append(text[start:end if end >= 0 else len(text)].strip())
    return lines


@dataclasses.dataclass(eq=False)
class _Watched:
    proc: subprocess.Popen[bytes]
    log: Path | None
    exit_codes: frozenset[int]
    unhandled_ok: bool
    why: str = ""
    done: bool = False


_WATCHED: list[_Watched] = []


def watch(proc: subprocess.Popen[bytes], log: Path | None, *,
          exit_codes: Collection[int] = (0,), unhandled_ok: bool = False,
          why: str = "") -> None:
    """Check ``proc`` after the test: its exit code is one of ``exit_codes`` and its ``log``
    has no unhandled exception (unless ``unhandled_ok``). Opting out needs a ``why``."""
    if (set(exit_codes) != {0} or unhandled_ok) and not why:
        raise ValueError("say why this worker may exit non-zero or log unhandled errors")
    _WATCHED.append(_Watched(proc, log, frozenset(exit_codes), unhandled_ok, why))


def expect(proc: subprocess.Popen[bytes], *, exit_codes: Collection[int] | None = None,
           unhandled_ok: bool | None = None, why: str) -> None:
    """Opt out for one watched worker, explicitly: the test kills it (``exit_codes={-9}``),
    makes it exit non-zero, or makes it log an unhandled exception on purpose."""
    if not why:
        raise ValueError("say why")
    for entry in _WATCHED:
        if entry.proc is proc:
            if exit_codes is not None:
                entry.exit_codes = frozenset(exit_codes)
            if unhandled_ok is not None:
                entry.unhandled_ok = unhandled_ok
            entry.why = why
            return
    raise ValueError(f"process {proc.pid} is not watched")


def audit_watched(*, final: bool = False) -> list[str]:
    """What is wrong with the watched workers that ended (all of them with ``final``, after
    stopping those still running); each is checked once."""
    live = [w.proc for w in _WATCHED if not w.done and w.proc.poll() is None]
    if final and live:
        stop_processes(live)
    problems = []
    for entry in _WATCHED:
        if entry.done or entry.proc.poll() is None:
            continue
        entry.done = True
        name = entry.log.name if entry.log is not None else f"pid {entry.proc.pid}"
        if entry.proc.returncode not in entry.exit_codes:
            problems.append(f"worker {name} (pid {entry.proc.pid}) exited with "
                            f"{entry.proc.returncode}, expected {sorted(entry.exit_codes)}")
        if not entry.unhandled_ok and entry.log is not None and entry.log.exists():
            for line in unhandled_errors(entry.log.read_text(errors="replace")):
                problems.append(f"worker {name} (pid {entry.proc.pid}) log: {line}")
    _WATCHED[:] = [w for w in _WATCHED if not w.done]
    return problems


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

    def start(self, *args: str, new_session: bool = False, exit_codes: Collection[int] = (0,),
              unhandled_ok: bool = False, why: str = "") -> subprocess.Popen[bytes]:
        """Start one more worker with extra CLI ``args``; it is watched (see ``watch``). With
        ``new_session`` it leads a process group of its own (``os.killpg(proc.pid, ...)``
        signals that group)."""
        n = len(self.procs)
        log = self.log_dir / f"worker{n}.log"
        proc = subprocess.Popen(
            [*self.command, "-l", "INFO", "-n", f"w{n}@%h", *args],
            env=self.env, cwd=self.proj_dir, stdout=log.open("wb"), stderr=subprocess.STDOUT,
            start_new_session=new_session,
        )
        watch(proc, log, exit_codes=exit_codes, unhandled_ok=unhandled_ok, why=why)
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
