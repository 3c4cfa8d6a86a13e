"""Publish and drain N no-op tasks on SQLite: taskframe's SQL transport vs Celery on kombu's.

Both run in one go, on the same machine, each on its own SQLite file (Celery through kombu's
``sqla+sqlite://`` transport, taskframe through its embedded default), same pool and
concurrency. Prints a table with ratios and writes ``bench-results-sqlite.json``.

    .venv/bin/python t/benchmarks/bench_sqlite_drain.py [-n 2000] [--pool solo]

Completion is detected by a last task that writes a marker file; with ``-P solo`` the queue is
FIFO and single-slot, so that task runs after every other one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

PROJECTS = {
    "taskframe": textwrap.dedent("""
        import os
        from taskframe import Taskframe
        app = Taskframe("benchproj", broker="sqlite:///{db}")
        app.conf.worker_hijack_root_logger = False

        @app.task(ignore_result=True)
        def noop(i):
            return i

        @app.task(ignore_result=True)
        def done(path):
            open(path, "w").close()
    """),
    "celery": textwrap.dedent("""
        import os
        from celery import Celery
        app = Celery("benchproj", broker="sqla+sqlite:///{db}")
        app.conf.broker_connection_retry_on_startup = True
        app.conf.worker_hijack_root_logger = False

        @app.task(ignore_result=True)
        def noop(i):
            return i

        @app.task(ignore_result=True)
        def done(path):
            open(path, "w").close()
    """),
}

WORKER = {
    "taskframe": [sys.executable, "-m", "taskframe", "-A", "benchproj", "worker", "-l", "WARNING"],
    "celery": [sys.executable, "-m", "celery", "-A", "benchproj", "worker", "-l", "WARNING",
               "--without-gossip", "--without-mingle", "--without-heartbeat"],
}


def run_one(name: str, n: int, pool: str, concurrency: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        (workdir / "benchproj.py").write_text(PROJECTS[name].format(db=workdir / "broker.db"))
        marker = workdir / "done.marker"
        code = textwrap.dedent(f"""
            import sys, time
            sys.path.insert(0, {str(workdir)!r})
            import benchproj
            benchproj.noop.delay(-1)  # creates tables and connections before timing
            start = time.perf_counter()
            for i in range({n}):
                benchproj.noop.delay(i)
            benchproj.done.delay({str(marker)!r})
            print(time.perf_counter() - start)
        """)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             cwd=workdir, check=True)
        publish_s = float(out.stdout.strip().splitlines()[-1])
        env = {**os.environ, "PYTHONPATH": str(workdir)}
        start = time.perf_counter()
        worker = subprocess.Popen([*WORKER[name], "-P", pool, "-c", str(concurrency)],
                                  cwd=workdir, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            while not marker.exists():
                if worker.poll() is not None:
                    raise RuntimeError(f"{name} worker exited with {worker.returncode}")
                if time.perf_counter() - start > 600:
                    raise RuntimeError(f"{name} did not drain {n} tasks in 600 s")
                time.sleep(0.01)
            drain_s = time.perf_counter() - start
        finally:
            worker.terminate()
            worker.wait(30)
    return {"publish_per_s": n / publish_s, "drain_per_s": (n + 2) / drain_s}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("--pool", default="solo", choices=["solo", "threads"])
    parser.add_argument("-c", "--concurrency", type=int, default=1)
    args = parser.parse_args()
    results = {name: run_one(name, args.n, args.pool, args.concurrency)
               for name in ("taskframe", "celery")}
    tf, ce = results["taskframe"], results["celery"]
    print(f"SQLite, {args.n} no-op tasks, -P {args.pool} -c {args.concurrency} "
          "(worker start included in drain time)")
    print(f"{'':24}{'taskframe':>12}{'celery':>12}{'ratio':>8}")
    for key, label in (("publish_per_s", "publish tasks/s"), ("drain_per_s", "drain tasks/s")):
        print(f"{label:24}{tf[key]:12.0f}{ce[key]:12.0f}{tf[key] / ce[key]:8.2f}x")
    Path("bench-results-sqlite.json").write_text(json.dumps(
        {"n": args.n, "pool": args.pool, "concurrency": args.concurrency, **results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
