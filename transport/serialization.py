"""Serializers and compression methods, by name and by MIME type.

Serializers (name -> content type, content encoding):

* ``json`` -> ``application/json``, ``utf-8`` (the default). Uses kombu's type
  tags so bodies are byte-for-byte what kombu writes: ``{"__type__": T,
  "__value__": V}`` for datetime, date, time, Decimal, UUID (``V`` is
  ``{"hex": ...}``) and bytes (``bytes`` with the text when it is valid UTF-8,
  else ``base64``). Objects with a ``__json__()`` method are encoded as what it
  returns; tuples become lists. A tag we do not know is a ``DecodeError``.
* ``pickle`` -> ``application/x-python-serialize``, ``binary``. Never unpickled
  unless ``accept`` names it: unpickling runs arbitrary code.
* ``msgpack`` -> ``application/x-msgpack``, ``binary`` (when ``msgpack`` imports).
* ``yaml`` -> ``application/x-yaml``, ``utf-8`` (when ``yaml`` imports; safe_load/safe_dump).
* ``raw``: bytes as ``application/data``/``binary``, str as ``text/plain``/``utf-8``.

Compression methods (the body is compressed and the ``compression`` header names
the MIME type): ``gzip``/``zlib`` -> ``application/x-gzip`` (a zlib stream, not a
gzip file: that is what kombu writes), ``bzip2`` -> ``application/x-bz2``,
``lzma``/``xz`` -> ``application/x-lzma``, and when installed ``brotli`` ->
``application/x-brotli`` and ``zstd`` -> ``application/zstd``.
"""

from __future__ import annotations

import base64
import bz2
import codecs
import json
import lzma
import os
import pickle
import uuid
import zlib
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import date, datetime, time
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from .errors import ContentDisallowed, DecodeError, EncodeError, ImproperlyConfigured

if TYPE_CHECKING:
    from .base import Message

__all__ = [
    "MAX_BODY_SIZE",
    "Serializer",
    "accept_mimetypes",
    "body_bytes",
    "compress",
    "decode_body",
    "decompress",
    "dumps",
    "ensure_accepted",
    "json_dumps",
    "json_loads",
    "loads",
    "serializers",
]

# Raw payloads: always allowed, because decoding them runs no parser (kombu trusts the same two).
_TRUSTED_CONTENT = frozenset({"application/data", "application/text"})
# Encodings that mean "leave the bytes alone".
_BINARY_ENCODINGS = frozenset({"binary", "ascii-8bit"})
# Names every taskframe and kombu process knows, installed here or not, so that
# ``accept_content=["msgpack"]`` is valid even where msgpack is missing.
_KNOWN_NAMES = {
    "json": "application/json",
    "pickle": "application/x-python-serialize",
    "msgpack": "application/x-msgpack",
    "yaml": "application/x-yaml",
}
_PICKLE_PROTOCOL = int(os.environ.get("PICKLE_PROTOCOL", "4"))


@dataclass(frozen=True)
class Serializer:
    """One registered serializer.

    Attributes:
        name: the name used in settings (``"json"``).
        content_type: the MIME type written on messages.
        content_encoding: the character set of the payload, or ``"binary"``.
        encode: object -> bytes.
        decode: bytes -> object.
    """

    name: str
    content_type: str
    content_encoding: str
    encode: Callable[[Any], bytes]
    decode: Callable[[bytes], Any]


# -- json with kombu's type tags -------------------------------------------------------


def _tag(kind: str, value: Any) -> dict[str, Any]:
    return {"__type__": kind, "__value__": value}


def _json_default(obj: Any) -> Any:
    reducer = getattr(obj, "__json__", None)
    if reducer is not None:
        return reducer()
    # datetime before date: a datetime is also a date.
    if isinstance(obj, datetime):
        return _tag("datetime", obj.isoformat())
    if isinstance(obj, date):
        return _tag("date", obj.isoformat())
    if isinstance(obj, time):
        return _tag("time", obj.isoformat())
    if isinstance(obj, Decimal):
        return _tag("decimal", str(obj))
    if isinstance(obj, uuid.UUID):
        return _tag("uuid", {"hex": obj.hex})
    if isinstance(obj, bytes | bytearray | memoryview):
        raw = bytes(obj)
        try:
            return _tag("bytes", raw.decode("utf-8"))
        except UnicodeDecodeError:
            return _tag("base64", base64.b64encode(raw).decode("ascii"))
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


_TAG_DECODERS: dict[str, Callable[[Any], Any]] = {
    "datetime": datetime.fromisoformat,
    "date": lambda v: datetime.fromisoformat(v).date(),
    "time": time.fromisoformat,
    "decimal": Decimal,
    "uuid": lambda v: uuid.UUID(**v),
    "bytes": lambda v: v.encode("utf-8"),
    "base64": lambda v: base64.b64decode(v.encode("ascii")),
}


def _json_object_hook(obj: dict[str, Any]) -> Any:
    if obj.keys() == {"__type__", "__value__"}:
        decoder = _TAG_DECODERS.get(obj["__type__"])
        if decoder is None:
            raise ValueError(f"unknown JSON type tag {obj['__type__']!r}")
        return decoder(obj["__value__"])
    return obj


def json_dumps(obj: Any) -> str:
    """Serialize ``obj`` to JSON text with kombu's type tags.

    The separators are json's defaults, as kombu's, so both write the same bytes.

    Raises:
        EncodeError: ``obj`` holds something JSON cannot express.
    """
    try:
        return json.dumps(obj, default=_json_default)
    except (TypeError, ValueError, RecursionError) as exc:
        raise EncodeError(str(exc)) from exc


def json_loads(text: str | bytes) -> Any:
    """Parse JSON text, turning kombu's type tags back into objects.

    Raises:
        DecodeError: the text is not JSON or holds an unknown or malformed tag.
    """
    try:
        if isinstance(text, bytes | bytearray | memoryview):
            text = bytes(text).decode("utf-8")
        return json.loads(text, object_hook=_json_object_hook)
    except (ValueError, TypeError, KeyError, AttributeError, ArithmeticError) as exc:
        raise DecodeError(str(exc)) from exc


def _json_encode(obj: Any) -> bytes:
    return json_dumps(obj).encode("utf-8")


# -- the registry ------------------------------------------------------------------------


def _pickle_encode(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=_PICKLE_PROTOCOL)


def _build_registry() -> dict[str, Serializer]:
    found = [
        Serializer("json", "application/json", "utf-8", _json_encode, json_loads),
        Serializer(
            "pickle", "application/x-python-serialize", "binary", _pickle_encode, pickle.loads
        ),
    ]
    try:
        import msgpack
    except ImportError:
        pass
    else:
        found.append(
            Serializer(
                "msgpack",
                "application/x-msgpack",
                "binary",
                lambda obj: msgpack.packb(obj, use_bin_type=True),
                lambda data: msgpack.unpackb(data, raw=False),
            )
        )
    try:
        import yaml
    except ImportError:
        pass
    else:
        found.append(
            Serializer(
                "yaml",
                "application/x-yaml",
                "utf-8",
                lambda obj: yaml.safe_dump(obj).encode("utf-8"),
                yaml.safe_load,
            )
        )
    return {serializer.name: serializer for serializer in found}


_BY_NAME = _build_registry()
_BY_TYPE = {serializer.content_type: serializer for serializer in _BY_NAME.values()}


def serializers() -> dict[str, Serializer]:
    """The serializers installed in this process, by name."""
    return dict(_BY_NAME)


def accept_mimetypes(names: Collection[str] | None) -> frozenset[str]:
    """Turn ``accept_content`` (names or MIME types) into MIME types.

    ``None`` means JSON only.

    Raises:
        ImproperlyConfigured: a name is neither a known serializer nor a MIME type.
    """
    if names is None:
        return frozenset({"application/json"})
    if isinstance(names, str):
        names = [names]
    mimes = set()
    for name in names:
        if "/" in name:
            mimes.add(name)
        elif name in _KNOWN_NAMES:
            mimes.add(_KNOWN_NAMES[name])
        elif name in _BY_NAME:
            mimes.add(_BY_NAME[name].content_type)
        else:
            known = ", ".join(sorted(set(_KNOWN_NAMES) | set(_BY_NAME)))
            raise ImproperlyConfigured(f"unknown serializer {name!r} (known: {known})")
    return frozenset(mimes)


def dumps(obj: Any, serializer: str = "json") -> tuple[str, str, bytes]:
    """Serialize ``obj``; return ``(content_type, content_encoding, data)``.

    ``serializer="raw"`` sends bytes or str as they are.

    Raises:
        EncodeError: the object cannot be serialized.
        ImproperlyConfigured: no serializer by that name is installed.
    """
    if serializer == "raw":
        if isinstance(obj, str):
            return "text/plain", "utf-8", obj.encode("utf-8")
        if isinstance(obj, bytes | bytearray | memoryview):
            return "application/data", "binary", bytes(obj)
        raise EncodeError(f"raw serializer needs bytes or str, not {type(obj).__name__}")
    try:
        codec = _BY_NAME[serializer]
    except KeyError:
        raise ImproperlyConfigured(
            f"serializer {serializer!r} is not installed (installed: {', '.join(_BY_NAME)})"
        ) from None
    try:
        data = codec.encode(obj)
    except EncodeError:
        raise
    except Exception as exc:
        raise EncodeError(f"cannot serialize with {serializer}: {exc}") from exc
    return codec.content_type, codec.content_encoding, data


def ensure_accepted(content_type: str, accept: Collection[str] | None = None) -> str:
    """Refuse ``content_type`` unless ``accept`` allows it (before touching the body).

    Returns:
        The content type (``application/data`` for an empty one).

    Raises:
        ContentDisallowed: ``content_type`` is not accepted.
    """
    content_type = content_type or "application/data"
    if content_type not in _TRUSTED_CONTENT and content_type not in accept_mimetypes(accept):
        raise ContentDisallowed(f"refusing to deserialize content of type {content_type!r}")
    return content_type


def loads(
    data: bytes | str,
    content_type: str,
    content_encoding: str,
    accept: Collection[str] | None = None,
) -> Any:
    """Deserialize ``data`` written with ``content_type``.

    Args:
        data: the (already decompressed) body.
        content_type: its MIME type; empty means raw bytes.
        content_encoding: its character set, or ``binary``.
        accept: serializer names or MIME types allowed; ``None`` means JSON only.
            Raw ``application/data`` is always allowed.

    Raises:
        ContentDisallowed: ``content_type`` is not accepted.
        DecodeError: the bytes do not parse.
    """
    content_type = ensure_accepted(content_type, accept)
    encoding = (content_encoding or "utf-8").lower()
    codec = _BY_TYPE.get(content_type)
    if codec is not None:
        try:
            if isinstance(data, str):
                data = data.encode("utf-8" if encoding in _BINARY_ENCODINGS else encoding)
            return codec.decode(data)
        except DecodeError:
            raise
        except Exception as exc:
            raise DecodeError(f"cannot deserialize {content_type}: {exc}") from exc
    if content_type in _KNOWN_NAMES.values():
        raise DecodeError(f"no decoder installed for {content_type} (install its library)")
    # Unknown but accepted types come back as text, or as bytes when binary.
    if isinstance(data, str) or encoding in _BINARY_ENCODINGS:
        return data
    try:
        return codecs.decode(data, encoding)
    except (UnicodeDecodeError, LookupError) as exc:
        raise DecodeError(f"cannot decode body as {encoding}: {exc}") from exc


#: The most bytes a received body may have, as received or decompressed, when the receiver
#: names no bound (a "zip bomb" is refused before it grows in memory). taskframe passes its
#: ``worker_max_message_size`` setting, whose default this is.
MAX_BODY_SIZE = 128 * 1024 * 1024


def body_bytes(message: Message, accept: Collection[str] | None = None,
               max_size: int | None = MAX_BODY_SIZE) -> bytes:
    """A received message's body, decompressed (``compression`` header), not yet parsed.

    The content type is checked first, so a refused body is never decompressed; then the
    body may have, and decompress to, at most ``max_size`` bytes (``None``: no bound).

    Raises:
        ContentDisallowed: the content type is not accepted.
        DecodeError: the body does not decompress, or it is (or decompresses to) more
            than ``max_size`` bytes.
    """
    ensure_accepted(message.content_type, accept)
    body = message.body
    if max_size is not None and len(body) > max_size:
        raise DecodeError(f"body of {len(body)} bytes is over the limit of {max_size}")
    method = message.headers.get("compression")
    if method:
        body = decompress(body, str(method), max_size)
    return body


def decode_body(message: Message, accept: Collection[str] | None = None,
                max_size: int | None = MAX_BODY_SIZE) -> Any:
    """Decompress (``compression`` header) and deserialize a received message's body.

    Args:
        accept: serializer names or MIME types allowed; ``None`` means JSON only.
        max_size: see ``body_bytes``.

    Raises:
        ContentDisallowed: the content type is not accepted.
        DecodeError: the body does not decompress or parse, or it is too big.
    """
    body = body_bytes(message, accept, max_size)
    return loads(body, message.content_type, message.content_encoding, accept)


# -- compression ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Compressor:
    mime: str
    compress: Callable[[bytes], bytes]
    decompress: Callable[[bytes], bytes]


def _build_compressors() -> tuple[dict[str, _Compressor], dict[str, str]]:
    found = {
        "application/x-gzip": _Compressor("application/x-gzip", zlib.compress, zlib.decompress),
        "application/x-bz2": _Compressor("application/x-bz2", bz2.compress, bz2.decompress),
        "application/x-lzma": _Compressor("application/x-lzma", lzma.compress, lzma.decompress),
    }
    aliases = {
        "gzip": "application/x-gzip",
        "zlib": "application/x-gzip",
        "bzip2": "application/x-bz2",
        "bzip": "application/x-bz2",
        "lzma": "application/x-lzma",
        "xz": "application/x-lzma",
    }
    brotli = _optional_module("brotli", "brotlicffi")
    if brotli is not None:
        found["application/x-brotli"] = _Compressor(
            "application/x-brotli", brotli.compress, brotli.decompress
        )
        aliases["brotli"] = "application/x-brotli"
    zstd = _optional_module("compression.zstd", "backports.zstd", "zstandard")
    if zstd is not None:
        found["application/zstd"] = _Compressor("application/zstd", zstd.compress, zstd.decompress)
        aliases["zstd"] = aliases["zstandard"] = "application/zstd"
    return found, aliases


def _optional_module(*names: str) -> Any:
    import importlib

    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


_COMPRESSORS, _COMPRESSION_ALIASES = _build_compressors()


def compress(data: bytes, method: str) -> tuple[bytes, str]:
    """Compress ``data`` with ``method`` (a name like ``"zlib"`` or a MIME type).

    Returns:
        ``(compressed, mime)``; put ``mime`` in the message's ``compression`` header.

    Raises:
        ImproperlyConfigured: the method is unknown or its library is not installed.
    """
    mime = _COMPRESSION_ALIASES.get(method, method)
    compressor = _COMPRESSORS.get(mime)
    if compressor is None:
        known = ", ".join(sorted(_COMPRESSION_ALIASES))
        raise ImproperlyConfigured(f"unknown compression {method!r} (available: {known})")
    return compressor.compress(data), compressor.mime


def decompress(data: bytes, mime: str, max_size: int | None = None) -> bytes:
    """Undo ``compress``; ``mime`` is the ``compression`` header (aliases accepted).

    Args:
        max_size: the most bytes the result may have (``None``: no bound). gzip, bzip2
            and lzma stop decompressing past it, so a small "zip bomb" never grows in
            memory; brotli and zstd are checked once decompressed.

    Raises:
        DecodeError: the method is unknown here, the data is corrupt, or it decompresses
            to more than ``max_size`` bytes.
    """
    name = _COMPRESSION_ALIASES.get(mime, mime)
    compressor = _COMPRESSORS.get(name)
    if compressor is None:
        raise DecodeError(f"cannot decompress {mime!r}: method unknown or not installed")
    try:
        if max_size is None:
            return compressor.decompress(data)
        bounded = _BOUNDED.get(name)
        if bounded is None:
            result = compressor.decompress(data)
        else:
            result = bounded().decompress(data, max_size + 1)
    except Exception as exc:
        raise DecodeError(f"corrupt {mime} data: {exc}") from exc
    if len(result) > max_size:
        raise DecodeError(f"{mime} body decompresses to more than {max_size} bytes")
    return result


#: Decompressors that stop at a size (``decompress(data, max_length)``).
_BOUNDED: dict[str, Callable[[], Any]] = {
    "application/x-gzip": zlib.decompressobj,
    "application/x-bz2": bz2.BZ2Decompressor,
    "application/x-lzma": lzma.LZMADecompressor,
}
