"""The fork servers of the ``prefork`` pool: quiet processes that fork the children.

Forking a process that runs several threads is unsafe: its other threads (the consumer,
the pool's supervisor, events, remote control) may be inside SQLite, a client library or a
lock at that instant, and the copy inherits that state frozen, held by a thread it does
not have. A child forked while another thread was in an SQLite transaction on the
embedded broker file deadlocks on its first query. So every process the children come
from is forked while it runs one thread:

- the worker forks the first server when the pool starts, before it starts a thread of
  its own (``Worker.start`` starts the event threads, the consumer, remote control and the
  health check after the pool); a thread running then all the same (one a ``worker_init``
  receiver started, say) is named in a warning;
- that server at once forks a *spare*: a copy of itself that waits, idle, on a socket of
  its own to the worker;
- when the server dies (``kill -9``, the OOM killer) its spare takes over and forks a spare
  of its own; a spare that dies is forked again by its server. Nothing is ever forked from
  the running worker, as billiard forks its replacement processes.

Why a spare rather than a fresh interpreter that imports the app (``exec``): a child must
be a copy of the worker as it stood at start (the app as the command line configured it,
its logging, the signal receivers connected then, such as the task events'), which
importing the app again would not rebuild. A spare is that copy, for the price of one idle
process sharing its memory copy-on-write. If a server and its spare die together, no
process is left to fork from safely: the pool says so (critical) and forks no more
children; restart the worker.

Process group: the first server leads a process group of its own, which its spare and
every child join. A signal to the worker's group (``kill -TERM -- -PGID``, GNU
``timeout``, supervisord's ``stopasgroup``, Ctrl-C) then reaches the worker alone, whose
warm shutdown lets running tasks finish and then stops the children itself; before, a
SIGTERM to the group killed every child at once (its task failed with
``WorkerLostError``, an idle one was logged as lost). systemd's default
``KillMode=control-group`` signals every process of the unit: use ``KillMode=mixed`` (as
``extra/systemd`` does). When the worker dies, its servers see their sockets close and
exit, and each child exits once its pipe closes (after the task it is running, if any).

Protocol on one ``SOCK_SEQPACKET`` socket pair per server, one pickle per packet:

- worker -> server: ``("fork", index)``, ``("spare",)``, ``("exit",)``;
- server -> worker: ``("forked", index, pid)`` with the worker's ends of the child's two
  socket pairs attached (``SCM_RIGHTS``), ``("spare", pid)`` with the worker's end of the
  spare's socket, and ``("exited", pid, exitcode)`` when the server reaps a child
  (``exitcode`` negative for a signal, as ``multiprocessing`` reports it).

The children are the server's, not the worker's: the server reaps them and says how they
ended (those of a server that died are reported by their closed pipes).
"""

from __future__ import annotations

import array
import contextlib
import logging
import multiprocessing
import os
import pickle
import select
import signal
import socket
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, NoReturn

from taskframe.pools._prefork_child import ChildOptions, child_main
from taskframe.pools._prefork_outcomes import human_status

if TYPE_CHECKING:
    from taskframe.client.app import Taskframe

__all__ = ["Zygote"]

logger = logging.getLogger("taskframe.pools.prefork")

_PACKET = 65536

#: In a fork server and its children: how many threads the process that forked that server
#: ran at the instant of the fork (1 unless a warning said otherwise); ``None`` elsewhere.
forked_from_threads: int | None = None


def _threads() -> list[str]:
    """The threads of this process now: native ones (``/proc``) where Python's are named."""
    names = [t.name for t in threading.enumerate()]
    try:
        native = len(os.listdir("/proc/self/task"))
    except OSError:
        return names
    return names + ["(not started by Python)"] * (native - len(names))


def _fork_server(role: str) -> int:
    """``os.fork()`` of a fork server, saying so when this process runs other threads."""
    threads = _threads()
    if len(threads) > 1:
        logger.warning("the prefork %s is forked while this process runs %d threads (%s): a "
                       "lock one of them holds now stays held in every child; start threads "
                       "after the pool (worker_ready)", role, len(threads), ", ".join(threads))
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the new server
        global forked_from_threads
        forked_from_threads = len(threads)
    return pid


def _wait_closed(sock: socket.socket, timeout: float) -> bool:
    """Wait until the peer's end of ``sock`` is closed (what comes meanwhile is dropped)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if not select.select([sock], [], [], left)[0]:
            continue
        try:
            if not sock.recv(_PACKET):
                return True
        except OSError:
            return True


class Zygote:
    """The worker's handle on one fork server (``start()`` forks the first one).

    Args:
        sock: the worker's end of the server's socket.
        pid: the server's pid.
        options: what every child gets (its ``index`` is set per fork).
        reap: the server is this process's own child (``close`` reaps it); a spare is
            its server's child.
    """

    def __init__(self, sock: socket.socket, pid: int, options: ChildOptions, *,
                 reap: bool) -> None:
        self.sock = sock
        self.pid = pid
        self.options = options
        self.spare: Zygote | None = None  # its spare, once it said so
        self._reap = reap
        self._send_lock = threading.Lock()

    @classmethod
    def start(cls, app: Taskframe, options: ChildOptions) -> Zygote:
        """Fork the first server (while this process runs one thread) and ask it for a spare.

        Args:
            app: the app (the servers and their children are copies of this process).
            options: what every child gets.
        """
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = _fork_server("fork server")
        if pid == 0:  # pragma: no cover - the server process
            mine.close()
            _serve(theirs, app, options, lead=True)
        theirs.close()
        server = cls(mine, pid, options, reap=True)
        with contextlib.suppress(OSError):  # dead already: its first read() says so
            server.ask_spare()
        return server

    def fork(self, index: int) -> None:
        """Ask for one more child; ``read()`` brings its pipes back."""
        self._send(("fork", index))

    def ask_spare(self) -> None:
        """Ask the server to fork its spare (its answer is kept by ``read()``)."""
        self._send(("spare",))

    def successor(self) -> Zygote | None:
        """The spare of this (dead) server, now a server itself and asked for a spare of
        its own; ``None`` when there is none, or it is gone too."""
        spare, self.spare = self.spare, None
        if spare is None:
            return None
        try:
            spare.ask_spare()
        except OSError:
            spare.close(timeout=0.1)
            return None
        return spare

    def read(self) -> list[tuple[Any, ...]]:
        """Every event waiting now: ``("forked", index, pid, conn, control)``,
        ``("exited", pid, exitcode)``; ``[("gone",)]`` once the server is dead."""
        events: list[tuple[Any, ...]] = []
        while True:
            try:
                data, fds = _recv_fds(self.sock)
            except (BlockingIOError, InterruptedError):
                return events
            except OSError:
                return [*events, ("gone",)]
            if not data:
                return [*events, ("gone",)]
            message = pickle.loads(data)
            if message[0] == "forked":
                events.append((*message, Connection(fds[0]), Connection(fds[1])))
            elif message[0] == "spare":
                self._on_spare(message[1], fds[0])
            elif message[0] == "exited" and self.spare and message[1] == self.spare.pid:
                self._on_spare_exit(message[2])
            else:
                events.append(message)

    def read_blocking(self) -> list[tuple[Any, ...]]:
        """Wait for at least one event, then return every event waiting."""
        select.select([self.sock], [], [])
        return self.read()

    def close(self, timeout: float = 2.0) -> None:
        """Tell the server (and its spare) to exit and wait until it has (SIGKILL after
        ``timeout``)."""
        spare, self.spare = self.spare, None
        if spare is not None:
            spare.close(timeout)
        with contextlib.suppress(OSError):
            self._send(("exit",))
        if not _wait_closed(self.sock, timeout):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)  # alive: it still holds its end
        self.sock.close()
        if self._reap:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)

    def _on_spare(self, pid: int, fd: int) -> None:
        if self.spare is not None:  # not asked for: keep one
            self.spare.close(timeout=0.1)
        self.spare = Zygote(socket.socket(fileno=fd), pid, self.options, reap=False)

    def _on_spare_exit(self, exitcode: int) -> None:
        assert self.spare is not None
        logger.error("the spare prefork fork server (pid %d) exited with %r: forking another",
                     self.spare.pid, human_status(exitcode))
        self.spare.sock.close()
        self.spare = None
        with contextlib.suppress(OSError):  # the server is gone too: read() says so
            self.ask_spare()

    def _send(self, message: tuple[Any, ...]) -> None:
        with self._send_lock:
            self.sock.send(pickle.dumps(message))


def _recv_fds(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One packet and the descriptors it carries, without blocking.

    (``socket.recv_fds`` ignores its ``flags`` argument before Python 3.12.)
    """
    fds = array.array("i")
    data, ancdata, _, _ = sock.recvmsg(_PACKET, socket.CMSG_LEN(2 * fds.itemsize),
                                       socket.MSG_DONTWAIT)
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - (len(payload) % fds.itemsize)])
    return data, list(fds)


def _serve(sock: socket.socket, app: Taskframe, options: ChildOptions, *,
           lead: bool = False) -> NoReturn:
    """A fork server's loop (never returns); ``lead``: make a process group of its own."""
    multiprocessing.current_process().name = "ForkServer"
    if lead:  # signals to the worker's group are the worker's (see the module docstring)
        with contextlib.suppress(OSError):
            os.setpgid(0, 0)
    # The server has nothing to finish: it ends when the worker says so or is gone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Not the terminal's foreground group: writing there must stop neither the server nor
    # its children, which inherit this (``stty tostop``).
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    code = 0
    try:
        while True:
            ready, _, _ = select.select([sock.fileno(), wake_r], [], [])
            if wake_r in ready:
                os.read(wake_r, 512)
            _reap(sock)
            if sock.fileno() in ready:
                data = sock.recv(_PACKET)
                if not data:
                    break  # the worker is gone
                message = pickle.loads(data)
                if message[0] == "exit":
                    break
                if message[0] == "fork":
                    _fork_child(sock, app, options, message[1], (wake_r, wake_w))
                elif message[0] == "spare":
                    _fork_spare(sock, app, options, (wake_r, wake_w))
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)


def _fork_spare(sock: socket.socket, app: Taskframe, options: ChildOptions,
                wake: tuple[int, int]) -> None:
    """Fork a copy of this server that serves on a socket of its own once the worker uses it."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = _fork_server("spare fork server")
    if pid == 0:  # pragma: no cover - the spare
        try:
            sock.close()  # the worker must see this server's end close when it dies
            mine.close()
            signal.set_wakeup_fd(-1)
            for fd in wake:
                os.close(fd)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        _serve(theirs, app, options)
    theirs.close()
    try:
        socket.send_fds(sock, [pickle.dumps(("spare", pid))], [mine.fileno()])
    finally:
        mine.close()


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        with contextlib.suppress(OSError):
            sock.send(pickle.dumps(("exited", pid, os.waitstatus_to_exitcode(status))))


def _fork_child(sock: socket.socket, app: Taskframe, options: ChildOptions, index: int,
                wake: tuple[int, int]) -> None:
    job_parent, job_child = socket.socketpair()
    control_parent, control_child = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child process
        code = 1
        try:
            sock.close()
            job_parent.close()
            control_parent.close()
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for fd in wake:
                os.close(fd)
            options.index = index
            child_main(app, Connection(job_child.detach()), Connection(control_child.detach()),
                       options)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    job_child.close()
    control_child.close()
    try:
        socket.send_fds(sock, [pickle.dumps(("forked", index, pid))],
                        [job_parent.fileno(), control_parent.fileno()])
    finally:
        job_parent.close()
        control_parent.close()
