"""The fork server of the ``prefork`` pool: one quiet process that forks the children.

Forking the worker itself once it runs is unsafe: its threads (the consumer, the
pool's supervisor, events, remote control) may be inside SQLite, a client
library or a lock at that instant, and the child inherits that state frozen. A
child forked from a process that was in the middle of an SQLite transaction on
the embedded broker file deadlocks on its first query. So the pool forks this
server once, at start, while the worker is still single-minded (app and tasks
imported, nothing running), and every child, the first ones and all
replacements, is forked from it.

Protocol on one ``SOCK_SEQPACKET`` socket pair, one pickle per packet:

- parent -> server: ``("fork", index)``, ``("exit",)``;
- server -> parent: ``("forked", index, pid)`` with the parent's ends of the
  child's two socket pairs attached (``SCM_RIGHTS``), and ``("exited", pid,
  exitcode)`` when the server reaps a child (``exitcode`` negative for a signal,
  as ``multiprocessing`` reports it).

The children are the server's, not the worker's: the server reaps them and says
how they ended. When the worker dies, the server sees the socket close and
exits; each child sees its own pipe close and exits too.
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
import traceback
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, NoReturn

from taskframe.pools._prefork_child import ChildOptions, child_main

if TYPE_CHECKING:
    from taskframe.client.app import Taskframe

__all__ = ["Zygote"]

logger = logging.getLogger("taskframe.pools.prefork")

_PACKET = 65536


class Zygote:
    """The worker's handle on its fork server.

    Args:
        app: the app (the server and its children are copies of this process).
        options: what every child gets (its ``index`` is set per fork).
    """

    def __init__(self, app: Taskframe, options: ChildOptions) -> None:
        self.app = app
        self.options = options
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._send_lock = threading.Lock()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the server process
            self.sock.close()
            _serve(theirs, app, options)
        theirs.close()
        self.pid = pid

    def fork(self, index: int) -> None:
        """Ask for one more child; ``read()`` brings its pipes back."""
        self._send(("fork", index))

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
            else:
                events.append(message)

    def read_blocking(self) -> list[tuple[Any, ...]]:
        """Wait for at least one event, then return every event waiting."""
        select.select([self.sock], [], [])
        return self.read()

    def close(self, timeout: float = 2.0) -> None:
        """Tell the server to exit and reap it (SIGKILL after ``timeout``)."""
        with contextlib.suppress(OSError):
            self._send(("exit",))
        self.sock.close()
        for _ in range(int(timeout / 0.02)):
            try:
                done, _ = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return
            if done:
                return
            select.select([], [], [], 0.02)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)

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


def _serve(sock: socket.socket, app: Taskframe, options: ChildOptions) -> NoReturn:
    """The fork server's loop (never returns)."""
    multiprocessing.current_process().name = "ForkServer"
    # The server has nothing to finish: it ends when the worker says so or is gone. A
    # SIGTERM to the whole group (systemd, Ctrl-C) is for the worker to handle.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
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
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)


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
