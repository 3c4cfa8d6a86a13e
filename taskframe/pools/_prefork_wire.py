"""The parent's reader of one prefork child's messages: one read per wake-up.

A child writes with ``multiprocessing.connection.Connection.send``: a 4-byte
big-endian signed length (or ``-1`` and an 8-byte unsigned one for huge
messages), then the pickle. ``Connection.recv`` reads the length and the body
in two system calls, after a ``poll()`` of its own; cProfile of the pool's
supervisor thread on a no-op drain showed those calls, each releasing and
taking back the GIL from the consumer thread, as most of its time. ``Inbox``
reads whatever is there in one ``os.read`` and cuts it into whole messages,
keeping a partial one for the next read.
"""

from __future__ import annotations

import os
import pickle
import struct
from multiprocessing.connection import Connection

__all__ = ["Inbox"]

# Bytes asked of the pipe per read: many "done" messages fit.
_CHUNK = 65536
_SHORT = struct.Struct("!i")
_LONG = struct.Struct("!Q")


class Inbox:
    """Buffered reading of a child's pipe, the parent's end of a ``Connection``."""

    def __init__(self, conn: Connection) -> None:
        self.fd = conn.fileno()
        self.buffer = bytearray()

    def receive(self) -> list[bytes]:
        """Read once (blocks only if nothing is readable) and return the whole
        messages buffered now, still pickled (``load`` each).

        Raises:
            EOFError: the child's end is closed.
            OSError: the read failed.
        """
        chunk = os.read(self.fd, _CHUNK)
        if not chunk:
            raise EOFError("the child's end of the pipe is closed")
        self.buffer += chunk
        return self._frames()

    def _frames(self) -> list[bytes]:
        buf = self.buffer
        frames: list[bytes] = []
        pos = 0
        while len(buf) - pos >= _SHORT.size:
            (size,) = _SHORT.unpack_from(buf, pos)
            head = _SHORT.size
            if size == -1:
                if len(buf) - pos < _SHORT.size + _LONG.size:
                    break
                (size,) = _LONG.unpack_from(buf, pos + _SHORT.size)
                head += _LONG.size
            if len(buf) - pos - head < size:
                break
            frames.append(bytes(buf[pos + head:pos + head + size]))
            pos += head + size
        del buf[:pos]
        return frames

    @staticmethod
    def load(frame: bytes) -> tuple[object, ...]:
        """One message from its pickle (what ``Connection.recv`` would have returned)."""
        message = pickle.loads(frame)
        if not isinstance(message, tuple):
            raise TypeError(f"a child message is a tuple, not {type(message).__name__}")
        return message
