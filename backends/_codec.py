"""Result values to bytes and back, with ``result_serializer`` and ``result_accept_content``.

Shared by the backends that store bytes. Reading also understands Celery 5.7's
``result_compression`` payloads (``b"\\x00celery-compressed\\x00" + MIME + b"\\x00" +
data``, ../shared/spec/celery-wire.md §6.1), whatever this process's own settings.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from taskframe.errors import ImproperlyConfigured
from taskframe.transport import serialization

__all__ = ["COMPRESSED_MAGIC", "ResultCodec"]

#: Prefix of a compressed result payload written by Celery 5.7.
COMPRESSED_MAGIC = b"\x00celery-compressed\x00"


class ResultCodec:
    """Encode and decode stored values with one serializer.

    Args:
        serializer: ``result_serializer`` name (``"json"``).
        accept: ``result_accept_content`` (names or MIME types).

    Raises:
        ImproperlyConfigured: the serializer is not installed.
    """

    def __init__(self, serializer: str, accept: Collection[str],
                 max_size: int | None = serialization.MAX_BODY_SIZE) -> None:
        codec = serialization.serializers().get(serializer)
        if codec is None:
            installed = ", ".join(sorted(serialization.serializers()))
            raise ImproperlyConfigured(
                f"result_serializer {serializer!r} is not installed (installed: {installed})"
            )
        self.serializer = serializer
        self.content_type = codec.content_type
        self.content_encoding = codec.content_encoding
        self.accept = tuple(accept)
        self.max_size = max_size

    def accepts(self, name: str) -> bool:
        """True when ``name`` (a serializer name) is in ``accept``."""
        mime = serialization.accept_mimetypes([name])
        return bool(mime & serialization.accept_mimetypes(self.accept))

    def encode(self, value: Any) -> bytes:
        """Serialize ``value``.

        Raises:
            EncodeError: the value cannot be serialized.
        """
        return serialization.dumps(value, self.serializer)[2]

    def decode(self, data: bytes | bytearray | memoryview) -> Any:
        """Deserialize stored bytes (decompressing Celery's compressed payloads).

        Raises:
            ContentDisallowed: our serializer is not in ``accept``.
            DecodeError: the bytes do not parse.
        """
        raw = bytes(data)
        if raw.startswith(COMPRESSED_MAGIC):
            mime, _, body = raw[len(COMPRESSED_MAGIC):].partition(b"\x00")
            raw = serialization.decompress(body, mime.decode("utf-8", "replace"),
                                           self.max_size)
        return serialization.loads(raw, self.content_type, self.content_encoding, self.accept)
