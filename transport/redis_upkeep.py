"""Upkeep of the Redis transport: routing through kombu's binding tables, claim refresh,
delayed-message promotion and the restore of expired held messages.

Plain functions of a redis-py client, a ``KeyLayout`` and the registered scripts, called
by ``RedisTransport`` and its parts (``redis_bindings.Bindings`` routes a publish,
``redis_claims.Claims`` refreshes claims) inside their ``translate_errors`` blocks:
nothing here catches redis-py exceptions itself.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Container, Iterable, Mapping
from typing import Any

import redis
from redis.commands.core import Script

from .errors import DecodeError
from .redis_layout import KeyLayout, decode_envelope, mark_redelivered, text
from .routing import topic_matches

__all__ = [
    "give_back_unsure",
    "promote_delayed",
    "refresh_claims",
    "restore_expired",
    "route",
    "stored_envelope",
]

logger = logging.getLogger("taskframe.transport.redis")

#: Delayed messages moved per script call.
PROMOTE_BATCH = 1000


def route(client: redis.Redis, layout: KeyLayout, exchange_type: str | None, exchange: str,
          routing_key: str) -> list[str]:
    """The queues bound to ``exchange`` that ``routing_key`` reaches (kombu's lookup).

    kombu does not store exchange types: a binding with a pattern (or an exchange we
    declared as ``topic``) matches as topic, any other as direct.
    """
    members = client.smembers(layout.binding_key(exchange))
    topic = exchange_type == "topic"
    queues: dict[str, None] = {}
    for raw in sorted(text(m) for m in members):
        parsed = layout.parse_member(raw)
        if parsed is None:
            continue
        key, pattern, queue = parsed
        wildcard = topic or bool(pattern)
        if topic_matches(key, routing_key) if wildcard else key == routing_key:
            queues[queue] = None
    return list(queues)


def refresh_claims(client: redis.Redis, layout: KeyLayout, tags: Iterable[str],
                   now: float) -> int:
    """Set the index score of every held ``tag`` that is still held to ``now``; count them."""
    scores = dict.fromkeys(tags, now)
    if not scores:
        return 0
    return int(client.zadd(layout.key(layout.unacked_index), scores, xx=True, ch=True) or 0)


def promote_delayed(client: redis.Redis, layout: KeyLayout, script: Script) -> int:
    """Move due delayed messages to their lists; return how many moved."""
    return int(script(keys=[layout.delayed_key],
                      args=[time.time(), PROMOTE_BATCH, layout.prefix], client=client))


def restore_expired(client: redis.Redis, layout: KeyLayout, scripts: Mapping[str, Script], *,
                    visibility_timeout: float, limit: int, mutex_expire: float,
                    exchange_types: Mapping[str, str]) -> int:
    """Give back up to ``limit`` messages held longer than ``visibility_timeout``.

    Runs under kombu's ``unacked_mutex`` (``SET NX PX``, released only by its owner) so
    one consumer at a time scans; each message moves in a compare-and-move script, so at
    most once even if the lock expired meanwhile. Returns how many were restored.
    """
    token = str(uuid.uuid4())
    mutex = layout.key(layout.unacked_mutex)
    if not client.set(mutex, token, nx=True, px=int(mutex_expire * 1000)):
        return 0
    try:
        return _restore_batch(client, layout, scripts, visibility_timeout, limit,
                              exchange_types)
    finally:
        scripts["release"](keys=[mutex], args=[token], client=client)


def _restore_batch(client: redis.Redis, layout: KeyLayout, scripts: Mapping[str, Script],
                   visibility_timeout: float, limit: int,
                   exchange_types: Mapping[str, str]) -> int:
    ceiling = time.time() - visibility_timeout
    found: list[bytes] = client.zrangebyscore(  # type: ignore[assignment]
        layout.key(layout.unacked_index), "-inf", ceiling, start=0, num=limit)
    tags = [text(t) for t in found]
    if not tags:
        return 0
    values = client.hmget(layout.key(layout.unacked), tags)
    restored = 0
    for tag, value in zip(tags, values, strict=True):
        old = "" if value is None else text(value)
        raw, keys = _target(client, layout, old, exchange_types)
        if value is not None and not keys:
            logger.error("cannot restore held message %s (unreadable, or no queue bound "
                         "any more); dropping it: %.2000s", tag, old)
        done = scripts["restore"](
            keys=[layout.key(layout.unacked), layout.key(layout.unacked_index), *keys],
            args=[tag, old, ceiling, mark_redelivered(raw, failed=True)], client=client,
        )
        if done:
            restored += 1
            logger.warning("restored message %s to %d list(s): its holder did not keep it "
                           "for %.0f s", tag, len(keys), visibility_timeout)
    return restored


def give_back_unsure(client: redis.Redis, layout: KeyLayout, scripts: Mapping[str, Script],
                     stamp: str, exclude: Container[str],
                     exchange_types: Mapping[str, str]) -> int:
    """Give back what a claim whose reply was lost took; return how many went back.

    That claim scored what it took ``stamp`` (its exact time, as sent): the entries of
    the index still at that score, but for ``exclude`` (what the caller holds: a refresh
    in the same microsecond scores alike), are its messages. Another consumer claiming
    or refreshing in the same fraction of a microsecond is the one (vanishing) risk of
    a message running twice. If the script never ran there are none.
    """
    found: list[bytes] = client.zrangebyscore(  # type: ignore[assignment]
        layout.key(layout.unacked_index), stamp, stamp)
    tags = [tag for tag in (text(t) for t in found) if tag not in exclude]
    if not tags:
        return 0
    unacked = layout.key(layout.unacked)
    given = 0
    for tag, value in zip(tags, client.hmget(unacked, tags), strict=True):
        if value is None:
            continue
        old = text(value)
        raw, keys = _target(client, layout, old, exchange_types)
        if not keys:
            continue  # left for the restorer, which logs what it cannot restore
        given += int(scripts["restore"](
            keys=[unacked, layout.key(layout.unacked_index), *keys],
            args=[tag, old, stamp, mark_redelivered(raw)], client=client,
        ))
    return given


def _target(client: redis.Redis, layout: KeyLayout, value: str,
            exchange_types: Mapping[str, str]) -> tuple[str, list[str]]:
    """The envelope of an ``unacked`` value and the lists it goes back to."""
    try:
        raw_env, exchange, routing_key = json.loads(value)
        raw = _as_json(raw_env)
        priority = decode_envelope(raw).priority
    except (DecodeError, ValueError, TypeError):
        return value, []
    queues = ([routing_key] if not exchange else
              route(client, layout, exchange_types.get(exchange), exchange, routing_key))
    step = layout.step(priority)
    return raw, [layout.key(layout.list_name(q, step)) for q in queues]


def stored_envelope(value: str) -> str:
    """The envelope JSON inside an ``unacked`` value ``[envelope, exchange, routing_key]``."""
    try:
        return _as_json(json.loads(value)[0])
    except (ValueError, IndexError, KeyError, TypeError):
        return value


def _as_json(obj: Any) -> str:
    # Plain json, no type tags decoded: the envelope goes back equivalent to what was read.
    return obj if isinstance(obj, str) else json.dumps(obj)
