"""kombu's Redis layout, the envelope, URLs and error translation for the Redis transport.

Everything here is a pure function of its arguments (no connection state), so
``taskframe.transport.redis`` keeps only the transport's behaviour. The key
names and channel prefixes are in the one constants block below; see
``taskframe.transport.redis`` for what each is used for.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import re
import uuid
from bisect import bisect
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis
import redis.exceptions
import redis.sentinel
from redis.backoff import NoBackoff
from redis.retry import Retry

from .base import Envelope
from .errors import (
    BrokerConnectionError,
    ConnectionLost,
    DecodeError,
    ImproperlyConfigured,
    TransportError,
)
from .serialization import json_dumps, json_loads
from .url import BrokerURL, parse_url

__all__ = [
    "BINDING_DEADLINES_KEY",
    "BINDING_PERMANENT_PREFIX",
    "BINDING_PREFIX",
    "DEFAULT_PRIORITY_STEPS",
    "DEFAULT_SEP",
    "DELAYED_KEY",
    "FAILED_DELIVERIES",
    "FANOUT_PREFIX",
    "UNACKED_INDEX_KEY",
    "UNACKED_KEY",
    "UNACKED_MUTEX_KEY",
    "Decoded",
    "KeyLayout",
    "build_client",
    "database_number",
    "decode_envelope",
    "encode_envelope",
    "mark_dead",
    "mark_redelivered",
    "ordered",
    "queue_expires",
    "text",
    "topic_pattern",
    "translate_errors",
]

# -- constants: every key prefix and channel name of the Redis transport ------------------------
#: Binding table of exchange E: a set of ``routing_key SEP pattern SEP queue`` (kombu).
BINDING_PREFIX = "_kombu.binding."
#: kombu 5.7: members of bindings whose queue has no x-expires (kept by its sweeper).
BINDING_PERMANENT_PREFIX = "_kombu.binding_permanent."
#: kombu 5.7: sorted set exchange -> deadline (ms) of binding tables of expiring queues.
BINDING_DEADLINES_KEY = "_kombu.binding_deadlines"
#: Held messages, shared with kombu: hash tag -> ``[envelope, exchange, routing_key]``.
UNACKED_KEY = "unacked"
#: Held messages, shared with kombu: sorted set tag -> time of claim (or last refresh).
UNACKED_INDEX_KEY = "unacked_index"
#: The restore lock, shared with kombu (``SET NX PX`` with a random token).
UNACKED_MUTEX_KEY = "unacked_mutex"
#: taskframe only: delayed messages, sorted set ``list key \n envelope`` -> due time.
DELAYED_KEY = "taskframe.delayed"
#: Fanout PUBLISH/PSUBSCRIBE channel prefix; ``{db}`` is the database number (kombu).
FANOUT_PREFIX = "/{db}."
#: Separator inside binding members and before a priority step in list keys (kombu).
DEFAULT_SEP = "\x06\x16"
DEFAULT_PRIORITY_STEPS = (0, 3, 6, 9)
#: taskframe only: an envelope property, the failed deliveries of the message so far (an
#: int; kombu and Celery carry unknown properties along and ignore them).
FAILED_DELIVERIES = "x-taskframe-failed-deliveries"
# -----------------------------------------------------------------------------------------------

#: Properties the transport writes into an envelope; not the publisher's.
TRANSPORT_PROPERTIES = ("delivery_info", "body_encoding", "delivery_tag", FAILED_DELIVERIES)
_MAX_PRIORITY = 9
_TOPIC_WILDCARDS = {"*": r"[^\.]+", "#": r".*?"}


@dataclass(frozen=True)
class KeyLayout:
    """Key and channel names for one set of transport options.

    ``global_keyprefix`` is part of every key and channel name returned here.
    """

    prefix: str = ""
    sep: str = DEFAULT_SEP
    steps: tuple[int, ...] = DEFAULT_PRIORITY_STEPS
    fanout_prefix: str = FANOUT_PREFIX.format(db=0)
    fanout_patterns: bool = True
    unacked: str = UNACKED_KEY
    unacked_index: str = UNACKED_INDEX_KEY
    unacked_mutex: str = UNACKED_MUTEX_KEY

    def key(self, name: str) -> str:
        """``name`` with the global key prefix."""
        return self.prefix + name

    def step(self, priority: int) -> int:
        """kombu's step for a priority: the largest step not above it (0-9, clamped)."""
        p = max(min(priority, _MAX_PRIORITY), 0)
        return self.steps[max(bisect(self.steps, p) - 1, 0)]

    def list_name(self, queue: str, step: int) -> str:
        """The list of ``queue`` for priority ``step`` (without the global prefix)."""
        return f"{queue}{self.sep}{step}" if step else queue

    def list_keys(self, queue: str) -> list[str]:
        """Every list of ``queue``, most urgent (lowest step) first, with the prefix."""
        return [self.key(self.list_name(queue, step)) for step in self.steps]

    def binding_key(self, exchange: str) -> str:
        return self.key(BINDING_PREFIX + exchange)

    def binding_permanent_key(self, exchange: str) -> str:
        return self.key(BINDING_PERMANENT_PREFIX + exchange)

    @property
    def binding_deadlines_key(self) -> str:
        return self.key(BINDING_DEADLINES_KEY)

    @property
    def delayed_key(self) -> str:
        return self.key(DELAYED_KEY)

    def member(self, routing_key: str, pattern: str, queue: str) -> str:
        """A binding-table member, as kombu writes it."""
        return self.sep.join([routing_key, pattern, queue])

    def parse_member(self, member: str) -> tuple[str, str, str] | None:
        parts = member.split(self.sep)
        return (parts[0], parts[1], parts[2]) if len(parts) == 3 else None

    def fanout_channel(self, exchange: str, routing_key: str) -> str:
        """The PUBLISH channel (and, with ``#`` as ``*``, the PSUBSCRIBE pattern)."""
        if routing_key and self.fanout_patterns:
            return f"{self.prefix}{self.fanout_prefix}{exchange}/{routing_key}"
        return f"{self.prefix}{self.fanout_prefix}{exchange}"


def topic_pattern(routing_key: str) -> str:
    """The regex kombu stores as the pattern of a topic binding."""
    words = routing_key.split(".")
    return "^" + r"\.".join(_TOPIC_WILDCARDS.get(w, re.escape(w)) for w in words) + "$"


def encode_envelope(
    envelope: Envelope, exchange: str, routing_key: str, priority: int, tag: str | None = None
) -> str:
    """The JSON text kombu's Redis transport stores for a message (see spec §2.1)."""
    props = {k: v for k, v in envelope.properties.items() if k not in TRANSPORT_PROPERTIES}
    props["delivery_info"] = {"exchange": exchange, "routing_key": routing_key}
    props["priority"] = priority
    props["body_encoding"] = "base64"
    props["delivery_tag"] = tag or str(uuid.uuid4())
    return json_dumps({
        "body": base64.b64encode(envelope.body).decode("ascii"),
        "content-encoding": envelope.content_encoding,
        "content-type": envelope.content_type,
        "headers": envelope.headers,
        "properties": props,
    })


@dataclass
class Decoded:
    """A stored envelope taken apart."""

    body: bytes
    content_type: str
    content_encoding: str
    headers: dict[str, Any]
    properties: dict[str, Any]
    exchange: str
    routing_key: str
    priority: int
    redelivered: bool
    tag: str | None
    failed: int = 0


def decode_envelope(raw: str | bytes) -> Decoded:
    """Parse a stored envelope.

    Raises:
        DecodeError: not JSON, or not shaped like kombu's envelope.
    """
    data = json_loads(raw)
    if not isinstance(data, dict) or not isinstance(data.get("properties"), dict):
        raise DecodeError("not a kombu envelope (no properties object)")
    props: dict[str, Any] = dict(data["properties"])
    info = props.get("delivery_info") or {}
    body = data.get("body") or ""
    encoding = props.get("body_encoding")
    try:
        if encoding == "base64":
            raw_body = base64.b64decode(body)
        else:
            raw_body = body.encode("utf-8") if isinstance(body, str) else bytes(body)
    except (binascii.Error, TypeError, ValueError) as exc:
        raise DecodeError(f"envelope body: {exc}") from exc
    try:
        priority = max(min(int(props.get("priority") or 0), _MAX_PRIORITY), 0)
    except (TypeError, ValueError):
        priority = 0
    headers = data.get("headers") or {}
    tag = props.get("delivery_tag")
    return Decoded(
        body=raw_body,
        content_type=str(data.get("content-type") or "application/data"),
        content_encoding=str(data.get("content-encoding") or "binary"),
        headers=dict(headers) if isinstance(headers, dict) else {},
        properties={k: v for k, v in props.items() if k not in TRANSPORT_PROPERTIES},
        exchange=str(info.get("exchange") or ""),
        routing_key=str(info.get("routing_key") or ""),
        priority=priority,
        redelivered=bool(info.get("redelivered") or headers.get("redelivered")),
        tag=tag if isinstance(tag, str) else None,
        failed=_count(props.get(FAILED_DELIVERIES)),
    )


def _count(value: Any) -> int:
    try:
        return max(0, int(value or 0))
    except (TypeError, ValueError):
        return 0


def mark_redelivered(raw: str, *, failed: bool = False) -> str:
    """``raw`` with kombu's redelivered flags set (header and delivery_info), or as is.

    ``failed``: one more failed delivery in the ``FAILED_DELIVERIES`` property.
    """
    try:
        data = json.loads(raw)
        data["headers"]["redelivered"] = True
        data["properties"]["delivery_info"]["redelivered"] = True
        if failed:
            props = data["properties"]
            props[FAILED_DELIVERIES] = _count(props.get(FAILED_DELIVERIES)) + 1
        return json.dumps(data)
    except (ValueError, KeyError, TypeError):
        return raw


def mark_dead(raw: str) -> str:
    """``raw`` for a dead-letter queue: its failed deliveries dropped (moved back, it runs)."""
    try:
        data = json.loads(raw)
        data["properties"].pop(FAILED_DELIVERIES, None)
        return json.dumps(data)
    except (ValueError, KeyError, TypeError, AttributeError):
        return raw


# -- client --------------------------------------------------------------------------------------


def _int_option(value: Any, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise ImproperlyConfigured(f"Redis {name} must be a number, not {value!r}") from exc


def database_number(url: BrokerURL) -> int:
    """The database number from the path (``/3``) or ``?virtual_host=``/``?db=`` (sockets)."""
    raw = url.query.get("db") or url.query.get("virtual_host") or ""
    if not raw and url.scheme != "redis+socket":
        raw = url.virtual_host.strip("/")
    return _int_option(raw, "database number") if raw else 0


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def build_client(url: str, options: Mapping[str, Any]) -> tuple[redis.Redis, int]:
    """A redis-py client for ``url`` (not connected yet) and its database number.

    Raises:
        ImproperlyConfigured: a bad URL or option.
    """
    parsed = parse_url(url)
    db = database_number(parsed)
    common: dict[str, Any] = {
        "db": db,
        "username": parsed.user or options.get("username"),
        "password": parsed.password or options.get("password"),
        "socket_timeout": _optional_float(options.get("socket_timeout", 10.0)),
        "socket_connect_timeout": _optional_float(
            options.get("socket_connect_timeout", options.get("connect_timeout", 4.0))
        ),
        "health_check_interval": float(options.get("health_check_interval", 25.0)),
        # Fail fast (retry_on_timeout: one immediate retry); the worker reconnects with backoff.
        "retry": Retry(NoBackoff(), 1 if options.get("retry_on_timeout") else 0),
        "client_name": options.get("client_name"),
    }
    scheme = parsed.scheme
    if scheme in ("sentinel", "redis+sentinel"):
        master = options.get("master_name") or parsed.query.get("master_name")
        if not master:
            raise ImproperlyConfigured("sentinel:// URLs need the transport option master_name")
        sentinel = redis.sentinel.Sentinel(
            [(parsed.host or "127.0.0.1", parsed.port or 26379)],
            sentinel_kwargs=dict(options.get("sentinel_kwargs") or {}),
            socket_timeout=common["socket_timeout"],
            socket_connect_timeout=common["socket_connect_timeout"],
        )
        master_client = sentinel.master_for(
            str(master), redis_class=redis.Redis, **common)
        return master_client, db
    if scheme == "redis+socket":
        path = parsed.path or parsed.host or ""
        return redis.Redis(unix_socket_path=path, **common), db
    if scheme not in ("redis", "rediss"):
        raise ImproperlyConfigured(f"the Redis transport does not serve {scheme}://")
    ssl: dict[str, Any] = {}
    if scheme == "rediss":
        extra = options.get("ssl")
        if extra is not None and not isinstance(extra, bool | Mapping):
            raise ImproperlyConfigured(
                f"the ssl option must be a dict of redis-py ssl_* arguments or a bool, "
                f"not {type(extra).__name__}")
        ssl = {"ssl": True, **(dict(extra) if isinstance(extra, Mapping) else {})}
    client = redis.Redis(host=parsed.host or "127.0.0.1", port=parsed.port or 6379, **common, **ssl)
    return client, db


@contextlib.contextmanager
def translate_errors(action: str, *, connecting: bool = False) -> Iterator[None]:
    """Turn redis-py exceptions into ``taskframe.transport.errors`` (the module edge)."""
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        # BusyLoadingError (a restarted server loading its data) is a ConnectionError too.
        kind = BrokerConnectionError if connecting else ConnectionLost
        raise kind(f"{action}: {type(exc).__name__}: {exc}") from exc
    except redis.exceptions.RedisError as exc:
        if connecting:
            raise BrokerConnectionError(f"{action}: {type(exc).__name__}: {exc}") from exc
        raise TransportError(f"{action}: {type(exc).__name__}: {exc}") from exc
    except OSError as exc:
        kind = BrokerConnectionError if connecting else ConnectionLost
        raise kind(f"{action}: {exc}") from exc


def text(value: str | bytes) -> str:
    """A Redis reply as text."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def queue_expires(arguments: Mapping[str, Any]) -> int | None:
    """A queue's ``x-expires`` in ms, or ``None``."""
    try:
        return int(arguments["x-expires"])
    except (KeyError, TypeError, ValueError):
        return None


def ordered(keys: Sequence[str], first: int) -> list[str]:
    """``keys`` rotated to start at index ``first`` (round-robin queue order)."""
    if not keys:
        return []
    first %= len(keys)
    return list(keys[first:]) + list(keys[:first])
