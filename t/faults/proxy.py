"""A TCP fault proxy on loopback, put between a worker and its broker (or result store).

The worker connects to ``proxy.port`` instead of the server's port; each accepted
connection gets an upstream connection of its own to the target. The test process
switches the link between modes, and every connection, open or new, follows:

* ``heal()`` (the start): bytes flow both ways, each chunk ``delay`` seconds late
  (``set_delay``; 0 by default).
* ``cut()``: every open connection is reset now (RST on both sides); new ones pass.
* ``refuse()``: open connections are reset and new ones are reset as soon as they are
  accepted: the server looks down while the proxy's port stays ours.
* ``blackhole()``: connections, open and new, stay open, but no byte moves either way
  and every byte sent into the hole is dropped, so nothing tells either end. ``heal()``
  ends it and resets the connections that lost bytes: their streams have gaps, and a
  real link would have timed them out.
* ``pause()``: no byte moves either way, but the bytes are kept; ``resume()`` (or
  ``heal()``) delivers them in order, as TCP retransmission does after a link stalls.

Why our own and not toxiproxy: one small file the tests control in-process, with
modes that match what the scenarios inject, and no server to install.

An asyncio loop in a daemon thread does the work; every control method is
thread-safe and returns once the loop has applied it. Loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["FaultProxy"]

T = TypeVar("T")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
CHUNK = 65536
PASS, BLACKHOLE, PAUSE, REFUSE = "pass", "blackhole", "pause", "refuse"


class _Link:
    """One proxied connection: the client's socket, the upstream socket, two pumps."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.lost_bytes = 0
        self.closed = False

    def writers(self) -> list[asyncio.StreamWriter]:
        return [w for w in (self.client, self.upstream) if w is not None]


class FaultProxy:
    """Forwards 127.0.0.1:``port`` to ``target_host``:``target_port``, with faults on demand.

    Attributes:
        port: where clients connect (a free port unless ``listen_port`` is given).
        mode: ``"pass"``, ``"blackhole"``, ``"pause"`` or ``"refuse"``.
        accepted: connections accepted so far (a scenario checks its traffic came through).
        resets: connections the proxy reset (cut, refused, healed after a black hole).
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1",
                 listen_port: int = 0) -> None:
        if target_host not in LOOPBACK:
            raise ValueError(f"the fault proxy forwards to loopback only, not {target_host!r}")
        self.target = (target_host, target_port)
        self.port = listen_port
        self.mode = PASS
        self.delay = 0.0
        self.accepted = 0
        self.resets = 0
        self._links: set[_Link] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy",
                                        daemon=True)
        self._server: asyncio.Server | None = None
        self._flowing: asyncio.Event | None = None

    # -- control, from any thread ----------------------------------------------------

    def start(self) -> FaultProxy:
        """Listen and start forwarding (mode ``pass``)."""
        self._thread.start()
        self._call(self._listen())
        return self

    def url(self, scheme: str, rest: str = "") -> str:
        """A URL pointing at the proxy, e.g. ``url("redis", "/0")``."""
        return f"{scheme}://127.0.0.1:{self.port}{rest}"

    def cut(self) -> int:
        """Reset every open connection now; return how many."""
        return self._call(self._cut())

    def refuse(self) -> int:
        """Reset open connections and every new one until ``heal()``."""
        return self._call(self._set_mode(REFUSE))

    def blackhole(self) -> None:
        """Keep every connection open and move no byte, dropping them, until ``heal()``."""
        self._call(self._set_mode(BLACKHOLE))

    def pause(self) -> None:
        """Keep every connection open and hold every byte until ``resume()``."""
        self._call(self._set_mode(PAUSE))

    def resume(self) -> None:
        """Deliver what a pause held, in order, and pass bytes again."""
        self._call(self._set_mode(PASS))

    def heal(self) -> int:
        """Pass bytes again; reset the connections that lost bytes to a black hole."""
        return self._call(self._set_mode(PASS))

    def set_delay(self, seconds: float) -> None:
        """Deliver each chunk ``seconds`` after it was read (0: at once)."""
        self.delay = float(seconds)

    @property
    def open_connections(self) -> int:
        return len(self._links)

    def close(self) -> None:
        """Reset every connection, stop listening, stop the loop's thread."""
        if not self._thread.is_alive():
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    # -- the loop's side ---------------------------------------------------------------

    async def _listen(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port,
                                                  reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _set_mode(self, mode: str) -> int:
        assert self._flowing is not None
        previous, self.mode = self.mode, mode
        reset = 0
        if mode == REFUSE:
            reset = await self._cut()
        if mode == PASS and previous == BLACKHOLE:
            for link in [lk for lk in self._links if lk.lost_bytes]:
                self._reset(link)
                reset += 1
        if mode == PASS:
            self._flowing.set()
        else:
            self._flowing.clear()
        return reset

    async def _cut(self) -> int:
        links = list(self._links)
        for link in links:
            self._reset(link)
        return len(links)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._cut()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        link = _Link(writer)
        if self.mode == REFUSE:
            self._reset(link)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            self._reset(link)  # the server is down: so is the link
            return
        link.upstream = up_writer
        if self.mode == REFUSE:  # refused while we connected
            self._reset(link)
            return
        self._links.add(link)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            chunks: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
            link.tasks.append(asyncio.create_task(self._read(link, src, chunks)))
            link.tasks.append(asyncio.create_task(self._write(link, dst, chunks)))

    async def _read(self, link: _Link, src: asyncio.StreamReader,
                    chunks: asyncio.Queue[tuple[float, bytes] | None]) -> None:
        loop = asyncio.get_running_loop()
        try:
            while data := await src.read(CHUNK):
                if self.mode == BLACKHOLE:
                    link.lost_bytes += len(data)
                    continue
                chunks.put_nowait((loop.time(), data))
        except OSError:
            pass
        chunks.put_nowait(None)  # end of stream: the writer closes the link after the rest

    async def _write(self, link: _Link, dst: asyncio.StreamWriter,
                     chunks: asyncio.Queue[tuple[float, bytes] | None]) -> None:
        assert self._flowing is not None
        loop = asyncio.get_running_loop()
        try:
            while (item := await chunks.get()) is not None:
                stamp, data = item
                await self._flowing.wait()
                wait = stamp + self.delay - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                    await self._flowing.wait()
                dst.write(data)
                await dst.drain()
        except OSError:
            pass
        self._close(link)

    def _close(self, link: _Link) -> None:
        """Close both sockets gracefully (one end hung up)."""
        if link.closed:
            return
        link.closed = True
        self._links.discard(link)
        for writer in link.writers():
            writer.close()
        for task in link.tasks:
            if task is not asyncio.current_task():
                task.cancel()

    def _reset(self, link: _Link) -> None:
        """Abort both sockets with an RST (SO_LINGER 0), as a broken link does."""
        if link.closed:
            return
        self.resets += 1
        for writer in link.writers():
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        self._close(link)
