"""Start a worker on the embedded default, send three tasks, print their results, stop.

Run from this directory: ``python run_demo.py`` (or ``make demo`` at the top).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from proj import add, divide, flaky


def main() -> int:
    for leftover in ("taskframe.sqlite3", "taskframe.sqlite3-wal", "taskframe.sqlite3-shm"):
        if os.path.exists(leftover):
            os.remove(leftover)
    worker = subprocess.Popen(
        [sys.executable, "-m", "taskframe", "-A", "proj", "worker", "-P", "threads", "-c", "2",
         "-l", "INFO"],
    )
    try:
        started = time.monotonic()
        countdown = add.apply_async((2, 3), countdown=2)
        retried = flaky.delay(2)
        failed = divide.delay(1, 0)
        print(f"add(2, 3) with countdown 2 s  -> {countdown.get(timeout=60)} "
              f"(after {time.monotonic() - started:.1f} s)")
        print(f"flaky(2)                      -> {retried.get(timeout=60)}")
        try:
            failed.get(timeout=60)
        except ZeroDivisionError as exc:
            print(f"divide(1, 0)                  -> raised {type(exc).__name__}: {exc}")
        else:
            print("divide(1, 0) did not raise")
            return 1
    finally:
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(timeout=30)
    print(f"worker stopped (exit code {code})")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
