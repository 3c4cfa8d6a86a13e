"""One run of a fault scenario: a broker, real worker processes, tasks, and what they did.

A ``Run`` gives its workers the project ``fproj`` (``t/faults/fproj/fproj.py``) on a
queue of its own (and, on Redis, a key prefix of its own); it sends tasks straight to
the broker and lets the workers reach it through ``worker_url`` (a fault proxy, or
a server the scenario stops). Every task records its start and its end in a SQLite
file of the run's own, so ``tally()`` can say, whatever the broker did:

* ``lost`` = sent - ended: tasks sent that never finished;
* ``duplicates`` = starts - sent, per task id: extra runs;
* ``interrupted``: tasks that started in a process the scenario killed, never ended
  and never ran again: with early acks that is the promise (at most once), so a
  scenario that kills with early acks counts them here, not as lost;
* ``forbidden_ran``: tasks that must never run (revoked, expired, malformed) and did;
* each worker's exit code and the unhandled exceptions its log shows.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import services
from workers import WorkerProcs, expect, wait_until

PROJ_DIR = Path(__file__).resolve().parent / "fproj"
sys.path.insert(0, str(PROJ_DIR))
import fproj  # noqa: E402  (the store's schema and connection, shared with the workers)

__all__ = ["Broker", "Run", "Tally", "alive", "children_of", "descendants_of", "unhandled_errors"]

#: Log lines that mean an exception nobody handled (a thread's or a process's).
_UNHANDLED = re.compile(r"^(Exception in thread|Traceback \(most recent call last\)|"
                        r"Exception ignored in|Fatal Python error)")
#: The line between two tracebacks of one chained exception.
_CHAINED = ("During handling of the above exception", "The above exception was the direct")
#: A log record's first line (taskframe's format starts with ``[YYYY-mm-dd``).
_RECORD = re.compile(r"^\[\d{4}-\d\d-\d\d")


@dataclass
class Broker:
    """Where a run's messages go: ``kind`` is ``"redis"`` or ``"amqp"``."""

    kind: str
    url: str


@dataclass
class Tally:
    """What one run counted (see the module docstring)."""

    sent: int = 0
    ended: int = 0
    starts: int = 0
    lost: int = 0
    duplicates: int = 0
    interrupted: int = 0
    forbidden_ran: int = 0
    exit_codes: list[int | None] = field(default_factory=list)
    unhandled: list[str] = field(default_factory=list)
    seconds: float = 0.0
    logs: str = ""
    notes: list[str] = field(default_factory=list)


def unhandled_errors(text: str) -> list[str]:
    """The exceptions nobody handled in a worker's log, with the log line before each.

    A traceback that a log record carries (``logger.exception``) follows that record's
    first line; one printed by ``threading.excepthook`` follows "Exception in thread",
    and an uncaught one in the main thread follows no record at all.
    """
    found = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not _UNHANDLED.match(line):
            continue
        if line.startswith("Traceback") and i > 0 and _RECORD.match(lines[i - 1]):
            continue  # a log record with exc_info: handled, and logged
        if line.startswith("Traceback") and i > 0 and lines[i - 1].startswith("Exception in"):
            continue  # counted once, on its "Exception in thread" line
        if line.startswith("Traceback") and i > 1 and not lines[i - 1] \
                and lines[i - 2].startswith(_CHAINED):
            continue  # the cause of the traceback before it, which was counted (or not)
        found.append("\n".join(lines[i:i + 12]))
    return found


def children_of(pid: int) -> list[int]:
    """The direct child processes of ``pid`` (Linux ``/proc``)."""
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
            kids.extend(int(k) for k in text.split())
    return kids


def alive(pid: int) -> bool:
    """``pid`` runs (a zombie does not: an orphan's reaper may be slow)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def descendants_of(pid: int) -> list[int]:
    """Every process under ``pid`` (prefork children may hang under a fork server)."""
    found, todo = [], children_of(pid)
    while todo:
        kid = todo.pop()
        found.append(kid)
        todo.extend(children_of(kid))
    return found


class Run:
    """The workers, the client and the record store of one run.

    Args:
        directory: a fresh folder for the store and the worker logs.
        broker: the broker the client publishes to (straight, never through a proxy).
        worker_url: the broker URL the workers get (default: ``broker.url``).
        conf: settings for both sides (``task_acks_late``, ``broker_transport_options``...).
        dead_letter: RabbitMQ: the run's queue dead-letters to ``<queue>.dead``.
    """

    def __init__(self, directory: Path, broker: Broker, *, worker_url: str | None = None,
                 conf: dict[str, Any] | None = None, dead_letter: bool = False) -> None:
        self.directory = directory
        self.broker = broker
        tag = self.tag = uuid.uuid4().hex[:8]
        self.queue = f"tffaults.{tag}"
        self.conf: dict[str, Any] = dict(conf or {})
        if broker.kind == "redis":
            self.prefix = f"tffaults{tag}."
            options = dict(self.conf.get("broker_transport_options", {}))
            options.setdefault("global_keyprefix", self.prefix)
            self.conf["broker_transport_options"] = options
        self.store = directory / "store.sqlite3"
        fproj.connect(str(self.store)).close()
        env = {"TASKFRAME_BROKER_URL": worker_url or broker.url, "FPROJ_STORE": str(self.store),
               "FPROJ_QUEUE": self.queue, "FPROJ_CONF": json.dumps(self.conf),
               "FPROJ_DEAD_LETTER": "1" if dead_letter else ""}
        self.dead_letter = dead_letter
        self.workers = WorkerProcs(PROJ_DIR, "fproj", env, directory)
        self.workers.env.pop("TASKFRAME_RESULT_BACKEND", None)
        self.sent: list[str] = []
        self.forbidden: list[str] = []
        self.killed: set[int] = set()
        self.started_at = time.monotonic()
        self._client: Any = None
        self.tally_: Tally | None = None

    # -- workers -------------------------------------------------------------------------

    def start_worker(self, *args: str, wait: bool = True) -> subprocess.Popen[bytes]:
        """Start one more worker (``args``: ``-P threads -c 4`` ...); wait until it is ready.

        Its node name is the run's own: workers of other runs (or other engineers) on a
        shared broker never share its pidbox queue, which is named after the node.
        """
        proc = self.workers.start(*args, "-n", f"tff{self.tag}w{len(self.workers.procs)}@%h")
        if wait:
            log = self.workers.logs[-1]
            wait_until(lambda: proc.poll() is not None or " ready. broker:" in log.read_text(),
                       90, f"worker {proc.pid} to be ready")
            assert proc.poll() is None, self.log_text()
        return proc

    def kill(self, pid: int) -> None:
        """``kill -9`` a worker or a pool child; with ``tally(at_most_once=True)`` a task
        whose one start died with it counts as interrupted, not lost."""
        self.killed.add(pid)
        for proc in self.workers.procs:
            if proc.pid == pid:  # the tests' worker check: this exit is the scenario's own
                expect(proc, exit_codes={-signal.SIGKILL}, why="the fault scenario kills it")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def wait_exited(self, pids: Iterable[int], timeout: float) -> None:
        """Wait until none of ``pids`` runs; fail after ``timeout`` seconds."""
        pids = list(pids)
        wait_until(lambda: not any(alive(pid) for pid in pids), timeout,
                   f"processes {pids} to exit")

    def stop_workers(self, timeout: float = 60.0) -> list[int | None]:
        """A warm shutdown of every worker still running (SIGTERM); their exit codes."""
        self.workers.stop(timeout)
        return [p.returncode for p in self.workers.procs]

    def log_text(self) -> str:
        return self.workers.log_text()

    # -- the client ----------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """A client app on ``broker.url`` with the run's settings and queue."""
        if self._client is None:
            from taskframe import Taskframe

            app = Taskframe("fproj-client", broker=self.broker.url, set_as_current=False)
            fproj.configure(app, self.queue, self.conf, self.dead_letter)
            self._client = app
        return self._client

    def forbid(self, ids: Iterable[str]) -> None:
        """These tasks must never run (revoked, expired, malformed): ``tally`` counts any."""
        self.forbidden.extend(ids)

    def send(self, n: int, seconds: float = 0.0) -> list[str]:
        """Send ``n`` ``fproj.work`` tasks of ``seconds`` each; their ids."""
        ids = [self.client.send_task("fproj.work", (seconds,), ignore_result=True).id
               for _ in range(n)]
        self.sent.extend(ids)
        return ids

    def queue_size(self, name: str) -> int:
        """Messages ready in queue ``name`` (on the client's broker)."""
        conn = self.client.connection()
        try:
            conn.connect()
            return int(conn.transport.queue_size(name))
        finally:
            conn.close()

    def redis_held(self) -> int:
        """Redis: messages still held (unacked) under the run's key prefix."""
        import redis

        client = redis.Redis.from_url(self.broker.url)
        try:
            return int(client.hlen(f"{self.prefix}unacked"))
        finally:
            client.close()

    # -- what happened -------------------------------------------------------------------

    def records(self) -> list[tuple[str, str, int]]:
        db = sqlite3.connect(str(self.store), timeout=60)
        try:
            return list(db.execute("SELECT kind, task_id, pid FROM runs"))
        finally:
            db.close()

    def started(self) -> int:
        """Tasks sent that started at least once."""
        starts = {task_id for kind, task_id, _pid in self.records() if kind == "start"}
        return sum(1 for t in self.sent if t in starts)

    def done(self, at_most_once: bool = False) -> int:
        """Tasks sent that ended, or (``at_most_once``) whose one start died with its process."""
        starts: dict[str, list[int]] = collections.defaultdict(list)
        ended = set()
        for kind, task_id, pid in self.records():
            if kind == "end":
                ended.add(task_id)
            elif kind == "start":
                starts[task_id].append(pid)
        return sum(1 for t in self.sent if t in ended or (
            at_most_once and len(starts[t]) == 1 and starts[t][0] in self.killed))

    def ended(self) -> int:
        return self.done()

    def wait_ended(self, timeout: float, count: int | None = None, stall: float = 15.0, *,
                   at_most_once: bool = False) -> bool:
        """Wait until ``count`` tasks (default: every one sent) are done; False when not.

        Done is ended, or with ``at_most_once`` interrupted (see ``done``). Gives up after
        ``timeout`` seconds, or after ``stall`` seconds in which no task got done: stuck
        work waits for nothing we would wait for (a visibility timeout is an hour).
        """
        want = len(self.sent) if count is None else count
        deadline = time.monotonic() + timeout
        last, last_change = -1, time.monotonic()
        while time.monotonic() < deadline:
            done = self.done(at_most_once)
            if done >= want:
                return True
            if done != last:
                last, last_change = done, time.monotonic()
            elif time.monotonic() - last_change > stall:
                return False
            time.sleep(0.2)
        return False

    def running_child(self, parent: int) -> int | None:
        """A descendant of ``parent`` running a task now (its last record a start)."""
        last: dict[int, str] = {}
        for kind, _task_id, pid in self.records():
            last[pid] = kind
        return next((k for k in descendants_of(parent) if last.get(k) == "start"), None)

    def wait_running_child(self, parent: int, timeout: float) -> int:
        """Wait for ``running_child``; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            child = self.running_child(parent)
            if child is not None:
                return child
            time.sleep(0.005)
        raise AssertionError(f"no child of {parent} ran a task within {timeout} s")

    def wait_until_started(self, ids: Iterable[str], timeout: float) -> None:
        """Wait until every task of ``ids`` (sent by the test itself) has started."""
        want = set(ids)
        wait_until(lambda: want <= {t for k, t, _ in self.records() if k == "start"},
                   timeout, f"tasks {sorted(want)} to start")

    def wait_started(self, count: int, timeout: float, poll: float = 0.1) -> None:
        """Wait until ``count`` tasks started, looking every ``poll`` seconds.

        A scenario that kills at a start polls fast: the kill then lands within a few
        milliseconds of the body starting, where an early ack not yet on the wire shows.
        """
        deadline = time.monotonic() + timeout
        while self.started() < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {count} "
                                     "task(s) to start")
            time.sleep(poll)

    def tally(self, *, stop: bool = True, at_most_once: bool = False) -> Tally:
        """Stop the workers (warm) and count; see the module docstring.

        Args:
            at_most_once: the semantics let a killed run end there (early acks, or a
                failed child without ``task_reject_on_worker_lost``): a task whose one
                start was in a process the scenario killed is interrupted, not lost.
        """
        if stop:
            self.stop_workers()
        # A process the scenario killed has no exit code to check (-9).
        codes = [p.returncode for p in self.workers.procs if p.pid not in self.killed]
        by_id: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
        for kind, task_id, pid in self.records():
            by_id[task_id].append((kind, pid))
        tally = Tally(sent=len(self.sent), exit_codes=codes)
        for task_id in self.sent:
            events = by_id.get(task_id, [])
            starts = [pid for kind, pid in events if kind == "start"]
            tally.starts += len(starts)
            tally.duplicates += max(0, len(starts) - 1)
            if any(kind == "end" for kind, _ in events):
                tally.ended += 1
            elif at_most_once and len(starts) == 1 and starts[0] in self.killed:
                tally.interrupted += 1
            else:
                tally.lost += 1
        tally.forbidden_ran = sum(1 for t in self.forbidden
                                  if any(kind == "start" for kind, _ in by_id.get(t, [])))
        for log in self.workers.logs:
            if log.exists():
                tally.unhandled.extend(f"{log.name}: {e}" for e in
                                       unhandled_errors(log.read_text(errors="replace")))
        tally.logs = self.log_text()
        tally.seconds = time.monotonic() - self.started_at
        self.tally_ = tally
        return tally

    def close(self) -> None:
        """Stop what is left, close the client, delete the run's queue and keys."""
        self.stop_workers(timeout=20)
        if self._client is not None:
            self._client.close()
        with contextlib.suppress(Exception):
            self.drop_names()

    def drop_names(self, extra_queues: Iterable[str] = ()) -> None:
        if self.broker.kind == "redis":
            import redis

            client = redis.Redis.from_url(self.broker.url)
            try:
                keys = list(client.scan_iter(match=f"{self.prefix}*", count=1000))
                if keys:
                    client.delete(*keys)
            finally:
                client.close()
            return
        dead = [f"{self.queue}.dead"] if self.dead_letter else []
        services.drop_broker_names(self.broker.url, queues=[self.queue, *dead, *extra_queues])
