"""The check of worker processes (``workers.watch``/``expect``/``audit_watched``), on real
processes and on the lines real Python writes for an unhandled exception."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from workers import audit_watched, expect, unhandled_errors, watch

# A process that logs a task failure the worker's way (a record with its traceback), then
# lets a thread die and a __del__ raise: Python's own reports of the last two.
SCRIPT = textwrap.dedent('''
    import logging, threading
    from taskframe.log import setup_logging

    setup_logging("INFO")
    log = logging.getLogger("taskframe.worker.trace")
    try:
        raise ValueError("a task failed")
    except ValueError:
        log.exception("Task proj.add[1] raised unexpected: ValueError('a task failed')")

    def dies():
        raise RuntimeError("a thread died")

    thread = threading.Thread(target=dies, name="taskframe-prefork")
    thread.start()
    thread.join()

    class Broken:
        def __del__(self):
            raise OSError("in __del__")

    Broken()
    log.info("still running")
''')


def _run(tmp_path: Path, code: str, name: str = "worker.log") -> tuple[subprocess.Popen[bytes],
                                                                       Path]:
    log = tmp_path / name
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)
    return proc, log


def test_unhandled_errors_sees_python_reports_not_logged_failures(tmp_path: Path) -> None:
    proc, log = _run(tmp_path, SCRIPT)
    assert proc.wait(60) == 0
    text = log.read_text()
    assert "Traceback" in text and "a task failed" in text  # logged: not unhandled
    found = unhandled_errors(text)
    assert found[0] == "Exception in thread taskframe-prefork:", text
    assert found[1].startswith("Exception ignored in: <function Broken.__del__"), text
    assert len(found) == 2, text


def test_audit_reports_exit_codes_and_unhandled_errors_unless_expected(tmp_path: Path) -> None:
    exits, exits_log = _run(tmp_path, "raise SystemExit(3)", "exits.log")
    logs, logs_log = _run(tmp_path, SCRIPT, "logs.log")
    watch(exits, exits_log)
    watch(logs, logs_log)
    exits.wait(60)
    logs.wait(60)
    problems = audit_watched()
    assert problems[:2] == [
        f"worker exits.log (pid {exits.pid}) exited with 3, expected [0]",
        f"worker logs.log (pid {logs.pid}) log: Exception in thread taskframe-prefork:",
    ]
    assert problems[2].startswith(f"worker logs.log (pid {logs.pid}) log: Exception ignored in")
    assert len(problems) == 3
    assert audit_watched() == []  # each is checked once

    exits, exits_log = _run(tmp_path, "raise SystemExit(3)", "exits2.log")
    logs, logs_log = _run(tmp_path, SCRIPT, "logs2.log")
    watch(exits, exits_log)
    watch(logs, logs_log, unhandled_ok=True, why="this test makes it log them")
    expect(exits, exit_codes={3}, why="this test makes it exit 3")
    exits.wait(60)
    logs.wait(60)
    assert audit_watched() == []


def test_opting_out_needs_a_reason(tmp_path: Path) -> None:
    proc, log = _run(tmp_path, "pass")
    with pytest.raises(ValueError):
        watch(proc, log, exit_codes={1})
    watch(proc, log)
    with pytest.raises(ValueError):
        expect(proc, exit_codes={1}, why="")
    proc.wait(60)
    assert audit_watched() == []


def test_a_worker_still_running_is_stopped_and_checked_at_the_end(tmp_path: Path) -> None:
    proc, log = _run(tmp_path, "import time; time.sleep(60)")
    watch(proc, log)
    assert audit_watched() == []  # still running: not checked yet
    problems = audit_watched(final=True)  # SIGTERM: Python's default handler ends it
    assert problems == [f"worker worker.log (pid {proc.pid}) exited with -15, expected [0]"]
