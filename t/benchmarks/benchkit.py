"""Plumbing for the worker benchmarks: broker URLs, queue purges, worker subprocesses, RSS.

Nothing here measures anything by itself; ``bench_workers`` uses it. Workers run one at a
time, each in a session of its own (so a prefork worker and its children form one process
group), and every worker started here is stopped on the way out, Ctrl-C included.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import amqp
import redis

HERE = Path(__file__).resolve().parent
PROJECT = HERE / "benchproj"
BIN = Path(sys.executable).parent

#: ``-P`` name -> ``-c`` used by every workload for that pool (same for both frameworks).
CONCURRENCY = {"prefork": 2, "threads": 8, "gevent": 100, "eventlet": 100, "solo": 1,
               "asyncio": 100}
#: Pools Celery has (it has no asyncio pool).
CELERY_POOLS = frozenset({"prefork", "threads", "gevent", "eventlet", "solo"})
#: Celery options that turn off what a taskframe worker does not do at start or while idle
#: (cluster-wide sync, gossip and heartbeat events): both sides do the same work.
CELERY_WORKER_FLAGS = ("--without-gossip", "--without-mingle", "--without-heartbeat")
FRAMEWORKS = ("taskframe", "celery")
APP_MODULE = {"taskframe": "tfbench", "celery": "celerybench"}


@dataclass(frozen=True)
class Broker:
    """One broker under test, and the names the benchmark uses on it.

    Args:
        name: ``redis`` or ``amqp``.
        url: its URL.
        prefix: Redis ``global_keyprefix`` of every broker and result key of this run.
    """

    name: str
    url: str
    prefix: str

    def queue(self, framework: str) -> str:
        """The dedicated queue of ``framework`` (``raw`` for the raw-client floor)."""
        return f"taskframe-bench-{framework}"

    def purge(self, queue: str) -> None:
        """Empty ``queue`` (and, on Redis, the messages held unacked under our prefix)."""
        if self.name == "redis":
            client = redis.Redis.from_url(self.url)
            try:
                keys = [self.prefix + queue] + [f"{self.prefix}{queue}\x06\x16{step}"
                                                for step in (3, 6, 9)]
                client.delete(*keys, self.prefix + "unacked", self.prefix + "unacked_index")
            finally:
                client.close()
            return
        # NotFound: not declared yet, so empty.
        with amqp_channel(self.url) as channel, contextlib.suppress(amqp.exceptions.NotFound):
            channel.queue_purge(queue)

    def cleanup(self) -> None:
        """Delete every queue (AMQP) or key (Redis) this run created."""
        if self.name == "redis":
            client = redis.Redis.from_url(self.url)
            try:
                keys = list(client.scan_iter(match=self.prefix + "*", count=1000))
                if keys:
                    client.delete(*keys)
            finally:
                client.close()
            return
        for framework in (*FRAMEWORKS, "raw"):
            with amqp_channel(self.url) as channel:
                channel.queue_delete(self.queue(framework))
            with contextlib.suppress(amqp.exceptions.NotFound), amqp_channel(self.url) as ch:
                ch.exchange_delete(self.queue(framework))


@contextlib.contextmanager
def amqp_channel(url: str) -> Iterator[Any]:
    """A py-amqp channel on ``url`` (``amqp://user:password@host:port/vhost``)."""
    conn = amqp_connect(url)
    try:
        yield conn.channel()
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def amqp_connect(url: str) -> Any:
    """A connected py-amqp ``Connection`` for an ``amqp://`` URL."""
    rest = url.split("://", 1)[1]
    creds, _, hostpart = rest.rpartition("@")
    user, _, password = creds.partition(":")
    host, _, vhost = hostpart.partition("/")
    conn = amqp.Connection(host=host, userid=user or "guest", password=password or "guest",
                           virtual_host=vhost or "/")
    conn.connect()
    return conn


def project_env(broker: Broker, framework: str, redis_url: str) -> dict[str, str]:
    """The ``BENCH_*`` variables the benchmark project reads (see ``benchtasks``)."""
    return {
        "BENCH_BROKER": broker.url,
        "BENCH_BACKEND": redis_url,
        "BENCH_REDIS": redis_url,
        "BENCH_PREFIX": broker.prefix,
        "BENCH_QUEUE": broker.queue(framework),
    }


class WorkerProcess:
    """One worker subprocess (``taskframe``/``celery -A ... worker``), its output in ``log``."""

    _live: set[WorkerProcess] = set()

    def __init__(self, framework: str, pool: str, concurrency: int, env: dict[str, str],
                 log: Path) -> None:
        self.framework = framework
        command = [str(BIN / framework), "-A", APP_MODULE[framework], "worker", "-P", pool,
                   "-c", str(concurrency), "-l", "warning", "-Q", env["BENCH_QUEUE"]]
        if framework == "celery":
            command += CELERY_WORKER_FLAGS
        self.log = log
        full_env = {**os.environ, **env, "PYTHONPATH": str(PROJECT)}
        self.started = time.time()
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(command, cwd=PROJECT, env=full_env, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        WorkerProcess._live.add(self)

    def check_alive(self) -> None:
        """Raise (with the end of the worker's log) when the worker has exited."""
        if self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.framework} worker exited with {self.proc.returncode}:\n"
                               f"{tail}")

    def rss(self) -> dict[str, int]:
        """Resident and proportional set size (bytes) of the worker and its descendants."""
        pids = [self.proc.pid, *descendants(self.proc.pid)]
        return {"rss": sum(_status_kb(pid, "VmRSS:") for pid in pids) * 1024,
                "pss": sum(_smaps_kb(pid, "Pss:") for pid in pids) * 1024,
                "processes": len(pids)}

    def stop(self, timeout: float = 20.0) -> None:
        """Warm shutdown (SIGTERM); the whole process group is killed after ``timeout``."""
        WorkerProcess._live.discard(self)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # leftover pool children, if any
        self.proc.wait()

    @classmethod
    def stop_all(cls) -> None:
        """Stop every worker still running (exit path, Ctrl-C)."""
        for worker in list(cls._live):
            worker.stop(timeout=5.0)


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from ``/proc``)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def _status_kb(pid: int, field: str) -> int:
    return _field_kb(Path(f"/proc/{pid}/status"), field)


def _smaps_kb(pid: int, field: str) -> int:
    return _field_kb(Path(f"/proc/{pid}/smaps_rollup"), field)


def _field_kb(path: Path, field: str) -> int:
    try:
        for line in path.read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def wait_for_file(path: Path, worker: WorkerProcess | None, timeout: float) -> float:
    """Wait until ``path`` (written by ``bench.mark``) exists; return the time inside it."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if worker is not None:
            worker.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {path.name}")
        time.sleep(0.005)
    return float(path.read_text())


def taskframe_pools() -> set[str]:
    """The pools this taskframe has (``taskframe.pools.POOLS``), asked in a subprocess.

    A subprocess keeps gevent/eventlet (imported by their pool modules) out of this one.
    """
    out = subprocess.run([sys.executable, "-c",
                          "from taskframe.pools import POOLS; print(' '.join(POOLS))"],
                         capture_output=True, text=True, check=True)
    return set(out.stdout.split())
