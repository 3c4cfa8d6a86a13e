"""Bodies written by taskframe decode in kombu, and the reverse (real kombu package)."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

import pytest
import services

from taskframe.transport import serialization
from taskframe.transport.errors import ContentDisallowed

kombu_serialization = services.require_module("kombu.serialization")
kombu_compression = services.require_module("kombu.compression")

pytestmark = pytest.mark.interop

SAMPLES: list[Any] = [
    {"args": [1, 2], "kwargs": {"x": "y"}, "embed": {"callbacks": None, "chord": None}},
    [1, 2.5, None, True, "é", {"nested": [[]]}],
    {"when": dt.datetime(2024, 1, 2, 3, 4, 5), "day": dt.date(2024, 1, 2), "t": dt.time(1, 2)},
    {"aware": dt.datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=dt.UTC)},
    {"money": Decimal("10.25"), "id": uuid.UUID("12345678123456781234567812345678")},
    {"text_bytes": b"hello", "binary": b"\x00\xff\x10"},
]
# What msgpack and yaml can carry without extension types.
PLAIN_SAMPLES: list[Any] = [SAMPLES[0], SAMPLES[1]]

ACCEPT_ALL = {
    "application/json",
    "application/x-python-serialize",
    "application/x-msgpack",
    "application/x-yaml",
}


@pytest.mark.parametrize("value", SAMPLES)
def test_json_bytes_identical_to_kombu(value: Any) -> None:
    ours = serialization.dumps(value, "json")
    theirs = kombu_serialization.dumps(value, serializer="json")
    assert ours[0] == theirs[0]
    assert ours[1] == theirs[1]
    their_bytes = theirs[2].encode("utf-8") if isinstance(theirs[2], str) else theirs[2]
    assert ours[2] == their_bytes


@pytest.mark.parametrize("value", SAMPLES)
def test_json_taskframe_to_kombu(value: Any) -> None:
    content_type, encoding, data = serialization.dumps(value, "json")
    assert kombu_serialization.loads(data, content_type, encoding, accept=ACCEPT_ALL) == value


@pytest.mark.parametrize("value", SAMPLES)
def test_json_kombu_to_taskframe(value: Any) -> None:
    content_type, encoding, data = kombu_serialization.dumps(value, serializer="json")
    assert serialization.loads(data, content_type, encoding) == value


@pytest.mark.parametrize("name", ["msgpack", "yaml", "pickle"])
@pytest.mark.parametrize("value", PLAIN_SAMPLES)
def test_other_serializers_both_ways(name: str, value: Any) -> None:
    if name not in serialization.serializers():
        # msgpack and PyYAML come with the dev extra: missing them is an install fault.
        services.unavailable(f"!!! the {name} package is not installed (pip install -e '.[dev]')")
    content_type, encoding, data = serialization.dumps(value, name)
    assert kombu_serialization.loads(data, content_type, encoding, accept=ACCEPT_ALL) == value
    content_type, encoding, data = kombu_serialization.dumps(value, serializer=name)
    if isinstance(data, str):
        data = data.encode(encoding)
    assert serialization.loads(data, content_type, encoding, accept=[name]) == value


def test_kombu_pickle_refused_without_accept() -> None:
    content_type, encoding, data = kombu_serialization.dumps({"a": 1}, serializer="pickle")
    with pytest.raises(ContentDisallowed):
        serialization.loads(data, content_type, encoding, accept=["json"])


@pytest.mark.parametrize("method", ["gzip", "zlib", "bzip2", "lzma", "xz"])
def test_compression_both_ways(method: str) -> None:
    data = b'{"payload": "' + b"x" * 500 + b'"}'
    packed, mime = serialization.compress(data, method)
    assert kombu_compression.decompress(packed, mime) == data
    their_packed, their_mime = kombu_compression.compress(data, method)
    assert their_mime == mime
    assert serialization.decompress(their_packed, their_mime) == data
