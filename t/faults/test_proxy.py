"""The fault proxy against a real server: the shared Redis, through plain sockets.

Each mode is checked from both ends: what the client sees (a reply, silence, a reset)
and what the server saw (a counter key incremented through the proxy, or not).
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
import services
from faults.proxy import FaultProxy


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    services.redis_url()
    with FaultProxy(6379) as proxy:
        yield proxy


@pytest.fixture
def key() -> Iterator[str]:
    name = f"tffaults.proxy.{uuid.uuid4().hex}"
    yield name
    direct = redis.Redis(host="127.0.0.1", port=6379)
    direct.delete(name)
    direct.close()


def _connect(proxy: FaultProxy, timeout: float = 2.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)


def _command(sock: socket.socket, line: str) -> bytes:
    sock.sendall(line.encode() + b"\r\n")
    return sock.recv(1024)


def _server_value(key: str) -> bytes | None:
    direct = redis.Redis(host="127.0.0.1", port=6379)
    try:
        value: bytes | None = direct.get(key)
        return value
    finally:
        direct.close()


def _is_dead(sock: socket.socket) -> bool:
    """The proxy reset or closed this socket (a reply of b"" or a reset)."""
    try:
        sock.sendall(b"PING\r\n")
        return sock.recv(1024) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def _refused(proxy: FaultProxy) -> bool:
    """A new connection is reset: during the handshake already, or at its first use."""
    try:
        sock = _connect(proxy)
    except ConnectionResetError:
        return True
    with sock:
        return _is_dead(sock)


def test_pass_forwards_both_ways_and_delay_adds_latency(proxy: FaultProxy) -> None:
    with _connect(proxy) as sock:
        assert _command(sock, "PING") == b"+PONG\r\n"
        proxy.set_delay(0.3)
        started = time.monotonic()
        assert _command(sock, "PING") == b"+PONG\r\n"
        assert time.monotonic() - started >= 0.6  # 0.3 s each way: a lower bound only
    assert proxy.accepted == 1


def test_cut_resets_open_connections_and_new_ones_pass(proxy: FaultProxy) -> None:
    sock = _connect(proxy)
    assert _command(sock, "PING") == b"+PONG\r\n"
    assert proxy.cut() == 1
    assert _is_dead(sock)
    sock.close()
    with _connect(proxy) as again:
        assert _command(again, "PING") == b"+PONG\r\n"


def test_blackhole_moves_no_byte_and_heal_resets_the_links_that_lost_some(
    proxy: FaultProxy, key: str,
) -> None:
    old = _connect(proxy, timeout=1.0)
    assert _command(old, "PING") == b"+PONG\r\n"
    idle = _connect(proxy, timeout=1.0)
    assert _command(idle, "PING") == b"+PONG\r\n"
    proxy.blackhole()
    with pytest.raises(socket.timeout):
        _command(old, f"INCR {key}")
    during = _connect(proxy, timeout=1.0)  # accepted, then silence
    with pytest.raises(socket.timeout):
        _command(during, "PING")
    assert _server_value(key) is None  # the INCR never reached the server
    assert proxy.heal() == 2  # ``old`` and ``during`` lost bytes; ``idle`` did not
    assert _is_dead(old) and _is_dead(during)
    assert _command(idle, "PING") == b"+PONG\r\n"
    assert _server_value(key) is None
    for sock in (old, idle, during):
        sock.close()


def test_pause_holds_bytes_and_resume_delivers_them_in_order(
    proxy: FaultProxy, key: str,
) -> None:
    with _connect(proxy, timeout=0.5) as sock:
        assert _command(sock, "PING") == b"+PONG\r\n"
        proxy.pause()
        sock.sendall(f"INCR {key}\r\nINCR {key}\r\n".encode())
        with pytest.raises(socket.timeout):
            sock.recv(1024)
        assert _server_value(key) is None
        proxy.resume()
        sock.settimeout(5)
        replies = b""
        while replies.count(b"\r\n") < 2:
            replies += sock.recv(1024)
        assert replies == b":1\r\n:2\r\n"
        assert _server_value(key) == b"2"


def test_refuse_resets_every_connection_until_heal(proxy: FaultProxy) -> None:
    sock = _connect(proxy)
    assert _command(sock, "PING") == b"+PONG\r\n"
    assert proxy.refuse() == 1
    assert _is_dead(sock)
    sock.close()
    assert _refused(proxy)
    proxy.heal()
    with _connect(proxy) as again:
        assert _command(again, "PING") == b"+PONG\r\n"


def test_a_server_that_is_down_resets_the_client(tmp_path: object) -> None:
    with socket.socket() as spare:
        spare.bind(("127.0.0.1", 0))
        port = spare.getsockname()[1]  # nothing listens there once closed
    with FaultProxy(port) as proxy:
        assert _refused(proxy)


def test_only_loopback_targets() -> None:
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy(6379, "10.0.0.1")
