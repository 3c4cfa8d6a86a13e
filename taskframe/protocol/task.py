"""Task messages on the wire: Celery protocol v2 out, v2/v1/hybrid in.

``encode_task`` turns a ``TaskMessage`` into the ``(headers, properties, body)``
triple a Celery 5.5-5.7 client publishes (../shared/spec/celery-wire.md §1.1);
``decode_task`` does the reverse for whatever a Celery or taskframe client sent
(§1.2, §1.7); ``decode_message`` starts from a received transport ``Message``
(bytes), deserializing and decompressing the body first.

Everything ``decode_*`` raises is one of ``InvalidTaskError`` (the message is
understood but malformed), ``DecodeError`` (the bytes are not what they claim)
or ``ContentDisallowed`` (the content type is not accepted), so the consumer can
decide between "reject" and "ack and drop" by class alone.
"""

from __future__ import annotations

import os
import reprlib
import socket
from collections.abc import Collection, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from taskframe.errors import InvalidTaskError
from taskframe.protocol.message import TaskMessage
from taskframe.transport import serialization

if TYPE_CHECKING:
    from taskframe.transport.base import Message

__all__ = ["decode_message", "decode_task", "encode_task", "safe_repr"]

#: Celery's ``argsrepr_maxsize``/``kwargsrepr_maxsize`` and ``task_repr_maxlevels``.
REPR_MAXSIZE = 1024
REPR_MAXLEVELS = 3

# Headers decode_task turns into TaskMessage fields; every other header is kept in
# ``extra_headers``. ``compression`` is kombu's and describes the bytes of *this*
# message: carrying it over to a re-encoded message would lie about its body.
_KNOWN_HEADERS = frozenset({
    "lang", "task", "id", "shadow", "eta", "expires", "group", "group_index", "retries",
    "timelimit", "root_id", "parent_id", "argsrepr", "kwargsrepr", "origin",
    "ignore_result", "replaced_task_nesting", "stamped_headers", "stamps", "compression",
})

# The fields a protocol v1 (or hybrid) body carries in place of headers (§1.7).
_V1_HEADER_FIELDS = (
    "lang", "task", "id", "root_id", "parent_id", "group", "group_index", "meth", "shadow",
    "eta", "expires", "retries", "timelimit", "argsrepr", "kwargsrepr", "origin",
)


def _make_repr() -> reprlib.Repr:
    # reprlib already survives objects whose __repr__ raises; the limits are
    # generous because the whole string is cut at REPR_MAXSIZE anyway.
    r = reprlib.Repr()
    r.maxlevel = REPR_MAXLEVELS
    r.maxstring = r.maxother = r.maxlong = REPR_MAXSIZE
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = r.maxfrozenset = 256
    r.maxdeque = r.maxarray = 256
    return r


_REPR = _make_repr()


def safe_repr(obj: Any, maxsize: int = REPR_MAXSIZE) -> str:
    """A ``repr`` that never raises, nests at most 3 levels and is cut to ``maxsize``."""
    try:
        text = _REPR.repr(obj)
    except Exception:  # a repr must never fail the publish
        text = f"<unrepresentable {type(obj).__name__} object>"
    if len(text) > maxsize:
        text = text[: maxsize - 3] + "..."
    return text


def _anon_nodename() -> str:
    return f"gen{os.getpid()}@{socket.gethostname()}"


def _as_utc(dt: datetime, utc: bool) -> datetime:
    """Naive datetimes mean UTC when ``utc``, local time otherwise."""
    if dt.tzinfo is None:
        return dt.replace(tzinfo=UTC) if utc else dt.astimezone()
    return dt


def _iso(dt: datetime | None, utc: bool) -> str | None:
    if dt is None:
        return None
    # Aware values keep their own offset, as Celery's ``eta.isoformat()`` does.
    return (_as_utc(dt, utc) if utc else dt).isoformat()


def encode_task(
    msg: TaskMessage, *, utc: bool = True
) -> tuple[dict[str, Any], dict[str, Any], list[Any]]:
    """Build Celery protocol v2 ``(headers, properties, body)`` for ``msg``.

    Args:
        msg: the task invocation.
        utc: ``enable_utc``: naive ``eta``/``expires`` are UTC and are sent with
            ``+00:00``; when false they are sent naive (local time).

    Returns:
        ``headers`` with every header Celery 5.5-5.7 sends (plus
        ``msg.extra_headers``), AMQP ``properties`` and the body
        ``[args, kwargs, embed]`` ready for the serializer.
    """
    argsrepr = msg.argsrepr or safe_repr(tuple(msg.args))
    kwargsrepr = msg.kwargsrepr or safe_repr(msg.kwargs)
    headers: dict[str, Any] = {
        "lang": "py",
        "task": msg.name,
        "id": msg.id,
        "shadow": msg.shadow,
        "eta": _iso(msg.eta, utc),
        "expires": _iso(msg.expires, utc),
        "group": msg.group,
        "group_index": msg.group_index,
        "retries": msg.retries,
        # [hard, soft]: Celery's code order; its docs have it backwards (§1.1).
        "timelimit": [msg.time_limit, msg.soft_time_limit],
        "root_id": msg.root_id or msg.id,
        "parent_id": msg.parent_id,
        "argsrepr": argsrepr,
        "kwargsrepr": kwargsrepr,
        "origin": msg.origin or _anon_nodename(),
        "ignore_result": msg.ignore_result,
        "replaced_task_nesting": msg.replaced_task_nesting,
        "stamped_headers": msg.stamped_headers,
        "stamps": dict(msg.stamps),
    }
    headers.update(msg.extra_headers)
    properties: dict[str, Any] = {
        "correlation_id": msg.correlation_id or msg.id,
        "reply_to": msg.reply_to or "",
        "delivery_mode": 2,
        "priority": msg.priority or 0,
    }
    if msg.expires is not None:
        remaining = (_as_utc(msg.expires, utc) - datetime.now(UTC)).total_seconds()
        properties["expiration"] = str(int(max(remaining, 0.0) * 1000))
    embed = {
        "callbacks": msg.callbacks,
        "errbacks": msg.errbacks,
        "chain": msg.chain,
        "chord": msg.chord,
    }
    return headers, properties, [list(msg.args), dict(msg.kwargs), embed]


# -- decoding ---------------------------------------------------------------------------


def decode_task(headers: Mapping[str, Any], properties: Mapping[str, Any],
                body: Any) -> TaskMessage:
    """Build a ``TaskMessage`` from a deserialized message.

    Accepts protocol v2 (``task`` header, body ``[args, kwargs, embed]``), v1
    (empty headers, body a dict with ``task``, ``id``, ``args``, ...) and hybrid
    (a v1 body whose fields message headers override). Optional headers may be
    missing; naive ``eta``/``expires`` are taken as UTC (v1 bodies with
    ``utc: false`` as local time).

    Raises:
        InvalidTaskError: ``id``/``task`` missing, or a field or the body has
            the wrong shape.
    """
    try:
        if isinstance(body, Mapping):
            return _decode_v1(headers, properties, body)
        return _decode_v2(headers, properties, body)
    except InvalidTaskError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError, OverflowError) as exc:
        # Validation below is meant to catch everything; this is the safety net
        # that keeps "never anything but InvalidTaskError" true for odd inputs.
        raise InvalidTaskError(f"malformed task message: {exc!r}") from exc


def _decode_v2(headers: Mapping[str, Any], properties: Mapping[str, Any],
               body: Any) -> TaskMessage:
    if not isinstance(body, list | tuple) or len(body) != 3:
        shape = f"{type(body).__name__} of length {len(body)}" if isinstance(
            body, list | tuple) else type(body).__name__
        raise InvalidTaskError(
            f"task body must be a 3-item list [args, kwargs, embed], got {shape}"
        )
    args, kwargs, embed = body
    return _build(headers, properties, args, kwargs, embed, utc=True)


def _decode_v1(headers: Mapping[str, Any], properties: Mapping[str, Any],
               body: Mapping[str, Any]) -> TaskMessage:
    fields: dict[str, Any] = {k: body[k] for k in _V1_HEADER_FIELDS if k in body}
    if "group" not in fields and "taskset" in body:  # v1's older name for group
        fields["group"] = body["taskset"]
    fields.update(headers)  # hybrid: real headers win over body fields
    embed = {
        "callbacks": body.get("callbacks"),
        "errbacks": body.get("errbacks"),
        "chord": body.get("chord"),
        "chain": None,
    }
    utc = body.get("utc", True)
    return _build(fields, properties, body.get("args", []), body.get("kwargs", {}), embed,
                  utc=bool(utc) if utc is not None else True)


def _build(headers: Mapping[str, Any], properties: Mapping[str, Any], args: Any,
           kwargs: Any, embed: Any, *, utc: bool) -> TaskMessage:
    task_id = headers.get("id")
    name = headers.get("task")
    if not isinstance(task_id, str) or not task_id:
        raise InvalidTaskError(f"task message has no valid 'id' (got {task_id!r})")
    if not isinstance(name, str) or not name:
        raise InvalidTaskError(f"task message {task_id} has no valid 'task' name (got {name!r})")
    if not isinstance(args, list | tuple):
        raise InvalidTaskError(f"task {task_id}: args must be a list, got {type(args).__name__}")
    if not isinstance(kwargs, Mapping):
        raise InvalidTaskError(
            f"task {task_id}: kwargs must be a mapping, got {type(kwargs).__name__}"
        )
    if embed is None:
        embed = {}
    if not isinstance(embed, Mapping):
        raise InvalidTaskError(
            f"task {task_id}: embed must be a mapping, got {type(embed).__name__}"
        )
    hard, soft = _timelimit(task_id, headers.get("timelimit"))
    return TaskMessage(
        id=task_id,
        name=name,
        args=list(args),
        kwargs=dict(kwargs),
        eta=_datetime(task_id, "eta", headers.get("eta"), utc),
        expires=_datetime(task_id, "expires", headers.get("expires"), utc),
        retries=_int(task_id, "retries", headers.get("retries"), 0),
        group=_opt_str(task_id, "group", headers.get("group")),
        group_index=_opt_int(task_id, "group_index", headers.get("group_index")),
        root_id=_opt_str(task_id, "root_id", headers.get("root_id")),
        parent_id=_opt_str(task_id, "parent_id", headers.get("parent_id")),
        time_limit=hard,
        soft_time_limit=soft,
        shadow=_opt_str(task_id, "shadow", headers.get("shadow")),
        origin=_opt_str(task_id, "origin", headers.get("origin")),
        ignore_result=_opt_bool(task_id, headers.get("ignore_result")),
        argsrepr=_opt_str(task_id, "argsrepr", headers.get("argsrepr")) or "",
        kwargsrepr=_opt_str(task_id, "kwargsrepr", headers.get("kwargsrepr")) or "",
        replaced_task_nesting=_int(task_id, "replaced_task_nesting",
                                   headers.get("replaced_task_nesting"), 0),
        stamped_headers=_opt_str_list(task_id, headers.get("stamped_headers")),
        stamps=_mapping(task_id, "stamps", headers.get("stamps")),
        callbacks=_sig_list(task_id, "callbacks", embed.get("callbacks")),
        errbacks=_sig_list(task_id, "errbacks", embed.get("errbacks")),
        chain=_sig_list(task_id, "chain", embed.get("chain")),
        chord=_sig(task_id, "chord", embed.get("chord")),
        correlation_id=_opt_str(task_id, "correlation_id", properties.get("correlation_id")),
        reply_to=_opt_str(task_id, "reply_to", properties.get("reply_to")) or None,
        priority=_opt_int(task_id, "priority", properties.get("priority")),
        extra_headers={k: v for k, v in headers.items()
                       if k not in _KNOWN_HEADERS and v is not None},
    )


def _datetime(task_id: str, field: str, value: Any, utc: bool) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):  # msgpack/pickle/yaml bodies may carry real datetimes
        parsed = value
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError as exc:
            raise InvalidTaskError(f"task {task_id}: invalid {field} value {value!r}") from exc
    else:
        raise InvalidTaskError(f"task {task_id}: invalid {field} value {value!r}")
    return _as_utc(parsed, utc).astimezone(UTC)


def _timelimit(task_id: str, value: Any) -> tuple[float | None, float | None]:
    if value is None:
        return None, None
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise InvalidTaskError(f"task {task_id}: timelimit must be [hard, soft], got {value!r}")
    hard, soft = value
    for limit in (hard, soft):
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int | float)):
            raise InvalidTaskError(f"task {task_id}: invalid timelimit {value!r}")
    return hard, soft


def _int(task_id: str, field: str, value: Any, default: int) -> int:
    result = _opt_int(task_id, field, value)
    return default if result is None else result


def _opt_int(task_id: str, field: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidTaskError(f"task {task_id}: {field} must be an integer, got {value!r}")
    return value


def _opt_bool(task_id: str, value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise InvalidTaskError(f"task {task_id}: ignore_result must be a boolean, got {value!r}")


def _opt_str(task_id: str, field: str, value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise InvalidTaskError(f"task {task_id}: {field} must be a string, got {value!r}")


def _opt_str_list(task_id: str, value: Any) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise InvalidTaskError(f"task {task_id}: stamped_headers must be a list of names")
    return list(value)


def _mapping(task_id: str, field: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidTaskError(f"task {task_id}: {field} must be a mapping, got {value!r}")
    return dict(value)


def _sig(task_id: str, field: str, value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InvalidTaskError(f"task {task_id}: {field} must be a signature dict")
    return dict(value)


def _sig_list(task_id: str, field: str, value: Any) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    if not isinstance(value, list | tuple):
        raise InvalidTaskError(f"task {task_id}: {field} must be a list of signatures")
    sigs = [_sig(task_id, field, v) for v in value]
    return [s for s in sigs if s is not None]


def decode_message(message: Message, accept: Collection[str],
                   max_size: int | None = None) -> TaskMessage:
    """Deserialize a received message's body and decode the task in it.

    The content type is checked first; then the body is decompressed when the
    ``compression`` header says so, to at most ``max_size`` bytes (``None``: no bound).

    Raises:
        ContentDisallowed: the content type is not in ``accept``.
        DecodeError: the body cannot be decompressed or deserialized, or it is (or
            decompresses to) more than ``max_size`` bytes.
        InvalidTaskError: the payload is not a task message.
        taskframe.transport.errors.ImproperlyConfigured: ``accept`` names an
            unknown serializer (a configuration error, not a message error).
    """
    data = serialization.body_bytes(message, accept, max_size)
    payload = serialization.loads(data, message.content_type, message.content_encoding,
                                  accept)
    return decode_task(message.headers, message.properties, payload)
