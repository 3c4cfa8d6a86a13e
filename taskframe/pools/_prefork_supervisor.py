"""The ``prefork`` parent's supervisor thread: child lifecycle and time limits.

One thread waits on every child's pipe, the fork server's socket and a wake-up
pipe (``PreforkPool._wake``), so the consumer thread never blocks on a child. It:

- reads what children write: ``ready`` (its start hooks ran, or failed) and
  ``done`` (the job's outcome, handed to ``job.on_done``), then sends the next job
  of the backlog to the child that freed;
- enforces time limits: SIGUSR1 at the soft limit, SIGKILL at the hard one (the
  parent then stores ``TimeLimitExceeded``);
- replaces children: a child that exits (recycled, retired, lost) is reported
  with its job, if any, and the fork server is asked for children until
  ``concurrency`` take jobs; a fork server that dies is replaced by its spare.

``Supervisor`` is a mixin base of ``PreforkPool`` (the pool's state lives there);
``Child`` is the parent's view of one child process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

from taskframe.pools._prefork_outcomes import (
    human_status,
    make_outcome,
    terminated,
    timed_out,
    worker_lost,
)
from taskframe.pools._prefork_wire import Inbox
from taskframe.pools._prefork_zygote import Zygote

if TYPE_CHECKING:
    import itertools

    from taskframe.client.app import Taskframe
    from taskframe.pools._prefork_child import JobSpec, WireOutcome
    from taskframe.pools.base import TaskJob

__all__ = ["Child", "Supervisor", "send_signal"]

logger = logging.getLogger("taskframe.pools.prefork")


class Child:
    """The parent's view of one child process."""

    def __init__(self, index: int, pid: int, conn: Connection, control: Connection,
                 zygote: Zygote) -> None:
        self.index = index
        self.pid = pid
        self.name = f"ForkPoolWorker-{index}"
        self.conn = conn
        self.inbox = Inbox(conn)  # reads what the child sends on ``conn``
        self.control = control
        self.zygote = zygote  # the server that forked it (and reports its exit)
        self.eof = False  # its pipe closed: it is dead or dying
        self.send_lock = threading.Lock()
        self.seq = 0
        self.job: TaskJob | None = None
        self.started: float | None = None  # monotonic, when the child took the job
        self.soft_sent = False
        self.retiring = False  # takes no more jobs; not replaced on exit
        self.terminated: int | None = None  # the signal terminate() sent

    def send(self, message: JobSpec | None) -> None:
        with self.send_lock:
            self.conn.send(message)

    def __repr__(self) -> str:
        return f"<child {self.name} pid:{self.pid}>"


class Supervisor:
    """The ``PreforkPool``'s part that runs in its supervisor thread, and the child
    lifecycle it shares with the pool's methods (``_maintain``, ``_retire``)."""

    # The pool's state this part reads and changes (set in ``PreforkPool.__init__``).
    concurrency: int
    _app: Taskframe
    _zygote: Zygote | None
    _pending: int
    _hook_error: str | None
    _children: list[Child]
    _lock: threading.RLock
    _changed: threading.Condition
    _index: itertools.count[int]
    _wake_r: int
    _wake_w: int
    _stopping: bool
    _closed: bool

    if TYPE_CHECKING:  # the pool's step that each freed child leads to
        def _dispatch_backlog(self) -> None: ...

    # -- child lifecycle (lock held) ----------------------------------------------------

    def _retire(self, child: Child) -> None:
        """No more jobs for ``child``; an idle one is told to exit now (lock held)."""
        child.retiring = True
        if child.job is None:
            with contextlib.suppress(OSError):  # already gone
                child.send(None)

    def _maintain(self) -> None:
        """Ask the server for children until ``concurrency`` take jobs (lock held)."""
        if self._stopping or self._zygote is None or self._hook_error:
            return
        live = sum(1 for c in self._children if not c.retiring) + self._pending
        for _ in range(self.concurrency - live):
            try:
                self._zygote.fork(next(self._index))
            except OSError as exc:  # the server died: the supervisor restarts it
                logger.error("cannot reach the prefork fork server: %s", exc)
                return
            self._pending += 1

    # -- the supervisor thread ----------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed
            os.write(self._wake_w, b"x")

    def _supervise(self) -> None:
        """The supervisor thread: it must outlive any error of one turn, or no job of this
        pool would ever be reported again (and acks_late messages would be held forever)."""
        while True:
            try:
                if not self._supervise_once():
                    return
            except Exception:
                logger.exception("prefork supervisor: a turn failed; going on")
                time.sleep(0.1)  # no busy loop if it keeps failing

    def _supervise_once(self) -> bool:
        """One turn: wait for children, the fork server or a deadline; False once closed."""
        with self._lock:
            if self._closed:
                return False
            children = list(self._children)
            timeout = self._next_deadline()
            zygote = self._zygote
        by_conn = {c.conn: c for c in children if not (c.eof or c.conn.closed)}
        server = [] if zygote is None else [zygote.sock]  # None: no fork server left
        try:
            ready = wait([self._wake_r, *server, *by_conn], timeout)
        except OSError:
            return True  # a child's fd was closed under us: look again
        if self._wake_r in ready:
            os.read(self._wake_r, 512)
        for obj in ready:
            if isinstance(obj, Connection) and obj in by_conn:
                self._drain(by_conn[obj], ready=True)
        if zygote is not None and zygote.sock in ready:
            self._on_server_events(zygote.read())
        self._check_limits()
        self._dispatch_backlog()
        return True

    def _on_server_events(self, events: list[tuple[Any, ...]]) -> None:
        for event in events:
            if event[0] == "forked":
                self._on_forked(*event[1:])
            elif event[0] == "exited":
                with self._lock:
                    found = [c for c in self._children if c.pid == event[1]]
                if found:
                    self._on_exit(found[0], event[2])
            elif event[0] == "gone":
                self._on_server_gone()

    def _on_forked(self, index: int, pid: int, conn: Connection, control: Connection) -> None:
        assert self._zygote is not None
        child = Child(index, pid, conn, control, self._zygote)
        with self._lock:
            self._pending = max(0, self._pending - 1)
            self._children.append(child)
            if self._stopping:
                self._retire(child)
            self._changed.notify_all()
        self._dispatch_backlog()

    def _on_server_gone(self) -> None:
        """The fork server died (killed by hand?): its spare takes over. Never a new one
        forked from here: this process runs threads (see ``_prefork_zygote``)."""
        with self._lock:
            old, self._pending = self._zygote, 0
            if self._stopping or old is None:
                return
            self._zygote = old.successor()
            old.close(timeout=0.1)
            if self._zygote is None:
                logger.critical("the prefork fork server (pid %d) died and so did its spare: "
                                "no process is left to fork children from safely, this pool "
                                "forks no more (restart the worker)", old.pid)
            else:
                logger.error("the prefork fork server (pid %d) died: its spare (pid %d) "
                             "takes over", old.pid, self._zygote.pid)
            orphans = [c for c in self._children if c.eof]
            self._maintain()
        for child in orphans:  # their exits were the old server's to report
            self._on_exit(child, None)

    def _drain(self, child: Child, *, block: bool = False, ready: bool = False) -> None:
        """Handle every message ``child`` has written (and wait for one with ``block``).

        ``ready``: ``wait()`` just said the pipe is readable; one read then, and what
        comes after it wakes the next ``wait()`` (no extra ``poll()`` per message).
        """
        while True:
            try:
                if child.conn.closed or not (block or ready or child.conn.poll()):
                    return
                frames = child.inbox.receive()
            except (EOFError, OSError):
                child.eof = True  # it died: the server reports how
                if child.zygote is not self._zygote:
                    self._on_exit(child, None)  # ... unless that server is gone
                return
            for frame in frames:
                try:
                    message = child.inbox.load(frame)
                except Exception:
                    logger.exception("unreadable message from %r", child)
                    continue
                if message[0] == "ready" and message[1] is not None:
                    with self._lock:  # it exits: no more children while the hook fails
                        self._hook_error = str(message[1])
                        child.retiring = True
                elif message[0] == "done":
                    self._on_done(child, *message[1:])  # type: ignore[arg-type]
            if frames:
                block = False
            if ready:
                return

    def _on_done(self, child: Child, seq: int, wire: WireOutcome, recycle: str | None) -> None:
        with self._lock:
            if child.seq != seq or child.job is None:
                return  # reported already (hard time limit)
            job, child.job = child.job, None
            if recycle is not None:
                child.retiring = True  # it exits by itself
            elif child.retiring:
                self._retire(child)  # shrink, stop or a terminate it survived
            self._maintain()
        self._dispatch_backlog()  # the next job first: the child is idle meanwhile
        job.on_done(job, make_outcome(wire.state, wire.retval, wire.traceback, wire.requeue))

    def _on_exit(self, child: Child, exitcode: int | None) -> None:
        """A child process ended: report its job if any, replace it."""
        if not child.eof:
            self._drain(child)
        with self._lock:
            if child not in self._children:
                return
            self._children.remove(child)
            job, child.job = child.job, None
            expected = child.retiring or self._stopping
            self._maintain()
            self._changed.notify_all()
        child.conn.close()
        child.control.close()
        if not expected or job is not None:
            logger.error("Process %r pid:%d exited with %r", child.name, child.pid,
                         human_status(exitcode))
        if job is None:
            return
        if child.terminated is not None:
            outcome = terminated(job, self._app)
        else:
            outcome = worker_lost(job, self._app, seq=child.seq, exitcode=exitcode,
                                  stopping=self._stopping)
        job.on_done(job, outcome)

    # -- time limits --------------------------------------------------------------------

    def _next_deadline(self) -> float:
        now, timeout = time.monotonic(), 1.0
        for child in self._children:
            job = child.job
            if job is None or child.started is None:
                continue
            if job.soft_time_limit and not child.soft_sent:
                timeout = min(timeout, child.started + job.soft_time_limit - now)
            if job.time_limit:
                timeout = min(timeout, child.started + job.time_limit - now)
        return max(timeout, 0.0)

    def _check_limits(self) -> None:
        now = time.monotonic()
        expired: list[tuple[Child, TaskJob]] = []
        with self._lock:
            for child in self._children:
                job = child.job
                if job is None or child.started is None:
                    continue
                elapsed = now - child.started
                if job.time_limit and elapsed >= job.time_limit:
                    child.job = None
                    child.retiring = True
                    expired.append((child, job))
                elif job.soft_time_limit and not child.soft_sent \
                        and elapsed >= job.soft_time_limit:
                    child.soft_sent = True
                    logger.warning("Soft time limit (%ss) exceeded for %s[%s]",
                                   job.soft_time_limit, job.task.name, job.id)
                    send_signal(child.pid, signal.SIGUSR1)
            if expired:
                self._maintain()
        for child, job in expired:
            send_signal(child.pid, signal.SIGKILL)
            job.on_done(job, timed_out(job, self._app))


def send_signal(pid: int, signum: int) -> None:
    """Send ``signum`` to process ``pid``; one already gone is no error."""
    with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
        os.kill(pid, signum)
