"""``make bench``: taskframe's worker against Celery's, same broker, same pool, same -c.

    .venv/bin/python t/benchmarks/run.py                      # everything, N = 20,000
    .venv/bin/python t/benchmarks/run.py --quick              # N = 2,000, fewer round trips
    .venv/bin/python t/benchmarks/run.py --brokers redis --pools solo,threads -n 5000
    .venv/bin/python t/benchmarks/run.py --workloads drain,rss --json /tmp/bench.json
    .venv/bin/python t/benchmarks/run.py --extras transport,sqlite,backends  # older scripts too

Prints one table per workload with taskframe/Celery ratios and writes every figure to a JSON
file (path printed at the end). What each workload measures: ``docs/benchmarks.md`` and the
docstring of ``bench_workers``. A pool taskframe does not have yet (not in
``taskframe.pools.POOLS``) shows as "n/a (pool not available)".
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import socket
import subprocess
import sys
import time
import uuid
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

from bench_workers import WORKLOAD_POOLS, Bench, Options
from benchkit import CONCURRENCY, Broker, WorkerProcess, taskframe_pools
from report import print_report

HERE = Path(__file__).resolve().parent
BROKERS = ("amqp", "redis")
#: The older single-purpose scripts, runnable from here: name -> (script, its "-n" flag).
EXTRAS = {
    "transport": [("bench_amqp.py", "--n"), ("bench_redis.py", "-n")],
    "sqlite": [("bench_sqlite_drain.py", "-n")],
    "backends": [("bench_backends.py", "-n"), ("bench_rpc.py", "-n")],
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=",".join(WORKLOAD_POOLS),
                        help="comma-separated, from: " + ", ".join(WORKLOAD_POOLS))
    parser.add_argument("--brokers", default=",".join(BROKERS), help="amqp, redis or both")
    parser.add_argument("--pools", default=None,
                        help="only these pools, from: " + ", ".join(CONCURRENCY)
                        + " (default: each workload's own set)")
    parser.add_argument("-n", type=int, default=None,
                        help="no-op tasks to drain (20,000; --quick 2,000)")
    parser.add_argument("--sleep-tasks", type=int, default=None,
                        help="100 ms tasks in the sleep workload (1,000; --quick 500)")
    parser.add_argument("--latency-calls", type=int, default=None,
                        help="timed .delay().get() round trips (500; --quick 100)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run each cell this many times, taskframe and Celery taking turns; "
                             "report medians")
    parser.add_argument("--quick", action="store_true", help="smaller counts, for a check")
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672//")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0",
                        help="Redis broker, result backend and counters")
    parser.add_argument("--json", default="bench-results-workers.json", help="output file")
    parser.add_argument("--extras", default="",
                        help="also run older scripts: " + ", ".join([*EXTRAS, "all"]))
    args = parser.parse_args(argv)
    quick = args.quick
    args.n = args.n or (2_000 if quick else 20_000)
    args.sleep_tasks = args.sleep_tasks or (500 if quick else 1_000)
    args.latency_calls = args.latency_calls or (100 if quick else 500)
    for name in _split(args.workloads):
        if name not in WORKLOAD_POOLS:
            parser.error(f"unknown workload {name!r}")
    for name in _split(args.pools):
        if name not in CONCURRENCY:
            parser.error(f"unknown pool {name!r}")
    for name in _split(args.brokers):
        if name not in BROKERS:
            parser.error(f"unknown broker {name!r}")
    for name in _split(args.extras):
        if name not in EXTRAS and name != "all":
            parser.error(f"unknown extra {name!r}")
    return args


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def _reachable(url: str, default_port: int) -> bool:
    hostport = url.split("://", 1)[1].rpartition("@")[2].split("/", 1)[0]
    host, _, port = hostport.partition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port or default_port)), 3).close()
    except OSError:
        return False
    return True


def _brokers(args: argparse.Namespace) -> list[Broker]:
    prefix = f"tfbench{uuid.uuid4().hex[:8]}."
    brokers = []
    for name in _split(args.brokers):
        url, port = (args.amqp_url, 5672) if name == "amqp" else (args.redis_url, 6379)
        if _reachable(url, port):
            brokers.append(Broker(name, url, prefix))
        else:
            print(f"!!! {name} is not reachable at {url}: skipped", file=sys.stderr)
    return brokers


def _versions() -> dict[str, str]:
    found = {}
    for dist in ("taskframe", "celery", "kombu", "billiard", "amqp", "redis", "gevent"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = "not installed"
    return found


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through Bench.run, which stops the workers


def run_extras(names: list[str], n: int) -> int:
    """Run the older scripts; ``all`` also runs any ``bench_*.py`` not listed (no options)."""
    commands: list[list[str]] = []
    for name in list(EXTRAS) if "all" in names else names:
        commands += [[str(HERE / script), flag, str(n)] for script, flag in EXTRAS[name]]
    if "all" in names:
        listed = {script for scripts in EXTRAS.values() for script, _ in scripts}
        commands += [[str(path)] for path in sorted(HERE.glob("bench_*.py"))
                     if path.name not in listed and path.name != "bench_workers.py"]
    failed = 0
    for command in commands:
        print(f"\n=== {Path(command[0]).name}", flush=True)
        failed += subprocess.run([sys.executable, *command]).returncode != 0
    return failed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    if not _reachable(args.redis_url, 6379):
        print(f"Redis at {args.redis_url} is needed (results, counters)", file=sys.stderr)
        return 69
    options = Options(brokers=_brokers(args), workloads=_split(args.workloads),
                      pools=_split(args.pools) or None, n=args.n, sleep_tasks=args.sleep_tasks,
                      latency_calls=args.latency_calls, redis_url=args.redis_url,
                      taskframe_pools=taskframe_pools(), repeat=max(1, args.repeat))
    meta: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(), "cpus": _cpu_count(), "python": platform.python_version(),
        "versions": _versions(), "n": args.n, "sleep_tasks": args.sleep_tasks,
        "latency_calls": args.latency_calls, "repeat": options.repeat,
        "brokers": {b.name: b.url for b in options.brokers},
        "taskframe_pools": sorted(options.taskframe_pools), "worker_logs": str(options.logdir),
    }
    print(f"taskframe {meta['versions']['taskframe']} vs celery {meta['versions']['celery']}; "
          f"taskframe pools here: {', '.join(meta['taskframe_pools'])}; "
          f"worker logs in {options.logdir}", flush=True)
    bench = Bench(options, lambda line: print(line, file=sys.stderr, flush=True))
    try:
        results = bench.run()
    except KeyboardInterrupt:
        WorkerProcess.stop_all()
        print("interrupted: workers stopped", file=sys.stderr)
        return 130
    meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print_report(meta, results)
    out = Path(args.json).resolve()
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"\nJSON written to {out}")
    return 1 if run_extras(_split(args.extras), args.n) else 0


def _cpu_count() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    sys.exit(main())
