"""Servers of the suite's own, on spare loopback ports, for scenarios that stop them.

Never the shared servers (6379, 5672): a ``RedisNode`` is a redis-server with its own
port and directory (append-only file, fsync always, so a stop keeps every
acknowledged write); a ``RabbitNode`` is a RabbitMQ node with its own name, ports and
directories (the recipe of /work/shared/notes/broker-clusters.md).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis
import services

__all__ = ["RabbitNode", "RedisNode", "spare_port"]


def spare_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} did not listen on port {port} within {timeout} s")


class RedisNode:
    """One private redis-server: start, stop (SIGKILL or SHUTDOWN NOSAVE), start again.

    The port and the directory stay the same across restarts, so the data comes back
    from the append-only file (``--appendfsync always``: what a client saw acknowledged
    is on disk).
    """

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            services.unavailable("!!! redis-server is not installed: fault scenarios that "
                                 "stop Redis cannot run")
        self.binary = binary
        self.directory = directory
        self.port = spare_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10)

    def start(self, *options: str) -> None:
        """Start, with ``options`` added to the command line; return once it answers PING
        (after loading its data: a loading server answers ``LOADING``)."""
        log = (self.directory / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.directory), "--appendonly", "yes", "--appendfsync", "always",
             "--save", "", "--protected-mode", "no", "--daemonize", "no", *options],
            stdout=log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                client = self.client()
                try:
                    if client.ping():
                        return
                finally:
                    client.close()
            time.sleep(0.05)
        raise AssertionError(f"redis-server on port {self.port} did not start")

    def stop(self, *, kill: bool = True) -> None:
        """Stop now: SIGKILL (a crash), or ``SHUTDOWN NOSAVE`` when ``kill`` is False."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        if kill:
            proc.send_signal(signal.SIGKILL)
        else:
            with contextlib.suppress(redis.RedisError):
                self.client().shutdown(nosave=True)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def pause_clients(self, seconds: float) -> None:
        """``CLIENT PAUSE``: the server answers no client (``ALL``) for ``seconds``."""
        client = self.client()
        try:
            client.execute_command("CLIENT", "PAUSE", int(seconds * 1000), "ALL")
        finally:
            client.close()


class RabbitNode:
    """One private RabbitMQ node; ``stop_app``/``start_app`` as an operator would.

    Started as root, RabbitMQ runs as the ``rabbitmq`` user: the node's directory is made
    with ``mkdtemp`` (pytest's tmp folders are private to root) and given to that user.
    """

    def __init__(self) -> None:
        for tool in ("rabbitmq-server", "rabbitmqctl"):
            if shutil.which(tool) is None:
                services.unavailable(f"!!! {tool} is not installed: fault scenarios that "
                                     "restart RabbitMQ cannot run")
        self.port = spare_port()
        self.dist_port = spare_port()
        self.name = f"tffaults{os.getpid()}x{self.port}@localhost"
        self.directory = Path(tempfile.mkdtemp(prefix="tffaults-rabbit-"))

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def ctl(self, *args: str, timeout: float = 120) -> str:
        out = subprocess.run(["rabbitmqctl", "-q", "-n", self.name, *args], capture_output=True,
                             text=True, timeout=timeout)
        if out.returncode != 0:
            raise AssertionError(f"rabbitmqctl {' '.join(args)}: {out.stdout}{out.stderr}")
        return out.stdout

    def start(self) -> None:
        d = self.directory
        (d / "mnesia").mkdir()
        (d / "log").mkdir()
        (d / "plugins").write_text("[].\n")
        (d / "rabbitmq.conf").write_text(f"listeners.tcp.default = 127.0.0.1:{self.port}\n")
        if os.geteuid() == 0:
            shutil.chown(d, "rabbitmq", "rabbitmq")
            for path in d.rglob("*"):
                shutil.chown(path, "rabbitmq", "rabbitmq")
        d.chmod(0o755)
        env = {**os.environ, "RABBITMQ_NODENAME": self.name,
               "RABBITMQ_NODE_PORT": str(self.port), "RABBITMQ_DIST_PORT": str(self.dist_port),
               "RABBITMQ_MNESIA_BASE": str(d / "mnesia"), "RABBITMQ_LOG_BASE": str(d / "log"),
               "RABBITMQ_PID_FILE": str(d / "pid"),
               "RABBITMQ_FEATURE_FLAGS_FILE": str(d / "feature_flags"),
               "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "plugins"),
               "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf")}
        subprocess.run(["rabbitmq-server", "-detached"], env=env, check=True, cwd=d,
                       capture_output=True, timeout=60)
        deadline = time.monotonic() + 90
        while True:  # before the node registers with epmd, await_startup fails at once
            try:
                self.ctl("await_startup", "--timeout", "60")
                break
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        _wait_port(self.port, 30, "RabbitMQ")

    def stop_app(self) -> None:
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")
        _wait_port(self.port, 30, "RabbitMQ")

    def stop(self) -> None:
        """Halt the node (its Erlang VM too) and remove its directory."""
        try:
            self.ctl("stop", timeout=60)
        except (AssertionError, subprocess.TimeoutExpired):
            pid_file = self.directory / "pid"
            if pid_file.exists():
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
        shutil.rmtree(self.directory, ignore_errors=True)
