"""Serializers, kombu's JSON type tags, accept lists and compression."""

from __future__ import annotations

import datetime as dt
import gzip
import uuid
import zlib
from decimal import Decimal
from typing import Any

import pytest
import services

from taskframe.transport import Message, serialization
from taskframe.transport.errors import (
    ContentDisallowed,
    DecodeError,
    EncodeError,
    ImproperlyConfigured,
)
from taskframe.transport.memory import MemoryTransport
from taskframe.transport.serialization import (
    accept_mimetypes,
    compress,
    decode_body,
    decompress,
    dumps,
    ensure_accepted,
    loads,
)

UID = uuid.UUID("8f1bd7f4-06c0-4e4b-9d1e-6b3c1f1b2a3c")


class Signature:
    """Anything with ``__json__`` is encoded as what it returns (like Celery's Signature)."""

    def __json__(self) -> dict[str, Any]:
        return {"task": "add", "args": [1, 2]}


def roundtrip(value: Any, serializer: str = "json", accept: list[str] | None = None) -> Any:
    content_type, encoding, data = dumps(value, serializer)
    return loads(data, content_type, encoding, accept=accept or [serializer])


def test_json_default_content_type() -> None:
    assert dumps({"a": 1}) == ("application/json", "utf-8", b'{"a": 1}')


@pytest.mark.parametrize(
    ("value", "tagged"),
    [
        (
            dt.datetime(2024, 1, 2, 3, 4, 5),
            '{"__type__": "datetime", "__value__": "2024-01-02T03:04:05"}',
        ),
        (
            dt.datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=dt.UTC),
            '{"__type__": "datetime", "__value__": "2024-01-02T03:04:05.000006+00:00"}',
        ),
        (dt.date(2024, 1, 2), '{"__type__": "date", "__value__": "2024-01-02"}'),
        (dt.time(3, 4, 5), '{"__type__": "time", "__value__": "03:04:05"}'),
        (Decimal("1.5"), '{"__type__": "decimal", "__value__": "1.5"}'),
        (UID, '{"__type__": "uuid", "__value__": {"hex": "8f1bd7f406c04e4b9d1e6b3c1f1b2a3c"}}'),
        (b"hi", '{"__type__": "bytes", "__value__": "hi"}'),
        (b"\xff", '{"__type__": "base64", "__value__": "/w=="}'),
    ],
)
def test_json_type_tags(value: Any, tagged: str) -> None:
    _, _, data = dumps({"v": value})
    assert data.decode() == '{"v": ' + tagged + "}"
    assert roundtrip({"v": value}) == {"v": value}


def test_json_tuples_become_lists_and_json_method_is_used() -> None:
    assert roundtrip({"t": (1, (2, 3)), "sig": Signature()}) == {
        "t": [1, [2, 3]],
        "sig": {"task": "add", "args": [1, 2]},
    }


@pytest.mark.parametrize("value", [object(), {1, 2}, {"k": object()}])
def test_unserializable_is_encode_error(value: Any) -> None:
    with pytest.raises(EncodeError):
        dumps(value)


@pytest.mark.parametrize(
    "data",
    [
        b'{"__type__": "frobnicate", "__value__": 1}',
        b'{"__type__": "uuid", "__value__": "not-an-object"}',
        b'{"__type__": "datetime", "__value__": "yesterday"}',
        b"{not json",
        b"\xff\xfe",
        b"",
    ],
)
def test_bad_json_is_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        loads(data, "application/json", "utf-8")


def test_json_accepts_text_input() -> None:
    assert loads('{"a": [1]}', "application/json", "utf-8") == {"a": [1]}


def test_pickle_refused_unless_accepted() -> None:
    content_type, encoding, data = dumps({"when": dt.date(2024, 1, 1)}, "pickle")
    assert (content_type, encoding) == ("application/x-python-serialize", "binary")
    with pytest.raises(ContentDisallowed):
        loads(data, content_type, encoding)
    with pytest.raises(ContentDisallowed):
        loads(data, content_type, encoding, accept=["json", "msgpack"])
    assert loads(data, content_type, encoding, accept=["pickle"]) == {"when": dt.date(2024, 1, 1)}
    assert loads(data, content_type, encoding, accept=[content_type]) == {
        "when": dt.date(2024, 1, 1)
    }


def test_msgpack_roundtrip() -> None:
    services.require_module("msgpack")
    content_type, encoding, data = dumps({"a": [1, "x", b"\x00"]}, "msgpack")
    assert (content_type, encoding) == ("application/x-msgpack", "binary")
    assert loads(data, content_type, encoding, accept=["msgpack"]) == {"a": [1, "x", b"\x00"]}
    with pytest.raises(ContentDisallowed):
        loads(data, content_type, encoding)  # JSON only by default


def test_yaml_roundtrip_and_safe_load() -> None:
    services.require_module("yaml")
    assert roundtrip({"a": [1, 2], "b": "x"}, "yaml") == {"a": [1, 2], "b": "x"}
    with pytest.raises(DecodeError):
        loads(b"!!python/object/apply:os.getcwd []", "application/x-yaml", "utf-8", ["yaml"])
    with pytest.raises(EncodeError):
        dumps({"o": object()}, "yaml")


def test_raw_payloads() -> None:
    assert dumps(b"\x00\x01", "raw") == ("application/data", "binary", b"\x00\x01")
    assert dumps("héllo", "raw") == ("text/plain", "utf-8", "héllo".encode())
    # Raw bytes are trusted: no parser runs, so no accept list is needed.
    assert loads(b"\x00\x01", "application/data", "binary") == b"\x00\x01"
    assert loads(b"\x00\x01", "", "binary") == b"\x00\x01"
    assert loads("héllo".encode(), "text/plain", "utf-8", accept=["text/plain"]) == "héllo"
    with pytest.raises(ContentDisallowed):
        loads(b"x", "text/plain", "utf-8")


def test_unknown_serializer_and_accept_names() -> None:
    with pytest.raises(ImproperlyConfigured):
        dumps({}, "nope")
    with pytest.raises(ImproperlyConfigured):
        accept_mimetypes(["json", "nope"])
    assert accept_mimetypes(None) == {"application/json"}
    assert accept_mimetypes(["json", "pickle", "application/x-custom"]) == {
        "application/json",
        "application/x-python-serialize",
        "application/x-custom",
    }
    assert "json" in serialization.serializers()


@pytest.mark.parametrize(
    ("method", "mime"),
    [
        ("gzip", "application/x-gzip"),
        ("zlib", "application/x-gzip"),
        ("bzip2", "application/x-bz2"),
        ("lzma", "application/x-lzma"),
        ("xz", "application/x-lzma"),
        ("application/x-bz2", "application/x-bz2"),
    ],
)
def test_compression_roundtrip(method: str, mime: str) -> None:
    data = b"taskframe " * 200
    packed, got_mime = compress(data, method)
    assert got_mime == mime
    assert len(packed) < len(data)
    assert decompress(packed, got_mime) == data
    assert decompress(packed, method) == data  # aliases decode too


def test_gzip_means_a_zlib_stream() -> None:
    packed, _ = compress(b"payload", "gzip")
    assert zlib.decompress(packed) == b"payload"
    with pytest.raises(OSError):
        gzip.decompress(packed)


def test_compression_errors() -> None:
    with pytest.raises(ImproperlyConfigured):
        compress(b"x", "snappy")
    with pytest.raises(DecodeError):
        decompress(b"x", "application/x-snappy")
    with pytest.raises(DecodeError):
        decompress(b"not compressed", "application/x-gzip")


def test_decode_body_handles_compression_header() -> None:
    content_type, encoding, data = dumps({"a": 1})
    packed, mime = compress(data, "bzip2")
    message = Message(
        MemoryTransport("memory://serialization"),
        body=packed,
        delivery_tag=1,
        content_type=content_type,
        content_encoding=encoding,
        headers={"compression": mime},
    )
    assert decode_body(message) == {"a": 1}
    assert message.decode(["json"]) == {"a": 1}
    with pytest.raises(ContentDisallowed):
        message.decode(["msgpack"])


@pytest.mark.parametrize("method", ["zlib", "bzip2", "lzma"])
def test_decompress_stops_at_max_size(method: str) -> None:
    data, mime = compress(b"\0" * 5_000_000, method)
    assert decompress(data, mime, max_size=5_000_000) == b"\0" * 5_000_000
    with pytest.raises(DecodeError, match="decompresses to more than 1000 bytes"):
        decompress(data, mime, max_size=1000)


def test_a_refused_content_type_is_refused_before_decompression() -> None:
    with pytest.raises(ContentDisallowed):
        ensure_accepted("application/x-python-serialize", ["json"])
    assert ensure_accepted("", ["json"]) == "application/data"


def test_decode_body_is_bounded_and_checks_the_content_type_first() -> None:
    """``Message.decode`` (events, control, rpc replies) has the bound task messages have:
    ``MAX_BODY_SIZE`` by default, the receiver's own when given, none with ``None``."""
    content_type, encoding, data = dumps({"pad": "0" * 3_000_000})
    packed, mime = compress(data, "zlib")

    def message(content: str = content_type, body: bytes = packed) -> Message:
        return Message(MemoryTransport("memory://serialization"), body=body, delivery_tag=1,
                       content_type=content, content_encoding=encoding,
                       headers={"compression": mime})

    with pytest.raises(DecodeError, match="decompresses to more than 1000000 bytes"):
        message().decode(max_size=1_000_000)
    with pytest.raises(DecodeError, match="body of 5000 bytes is over the limit of 4000"):
        message(body=b"\0" * 5000).decode(max_size=4000)
    assert message().decode()["pad"] == "0" * 3_000_000  # under MAX_BODY_SIZE
    assert message().decode(max_size=None)["pad"] == "0" * 3_000_000
    # A refused type is refused as such: its (corrupt) body is never decompressed.
    with pytest.raises(ContentDisallowed):
        message("application/x-python-serialize", b"not zlib").decode(["json"], 10)
