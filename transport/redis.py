"""The Redis transport, on redis-py, in kombu's layout so Celery and taskframe share queues.

Features:
    * kombu's keys and envelope (``taskframe.transport.redis_layout`` holds the
      one constants block): a queue ``Q`` is the lists ``Q``, ``Q\\x06\\x163``,
      ``Q\\x06\\x166``, ``Q\\x06\\x169``; publishing LPUSHes kombu's JSON
      envelope (base64 body, ``body_encoding``, ``delivery_tag``,
      ``delivery_info``) and consumers pop from the right, so a Celery client's
      task runs on a taskframe worker and the reverse.
    * Exchanges as kombu emulates them: ``_kombu.binding.<exchange>`` sets
      (direct and topic), kombu 5.7's ``_kombu.binding_permanent.<exchange>`` and,
      for queues with ``x-expires``, the ``_kombu.binding_deadlines`` refresh.
      Fanout exchanges are PUBLISH/PSUBSCRIBE on ``/{db}.<exchange>`` (live
      subscribers only, no acks), as Celery's pidbox and events use them.
    * Reliable delivery, shared with kombu's ``unacked`` hash and
      ``unacked_index`` sorted set: taking a message and recording it as held is
      ONE Lua script (RPOP + HSET + ZADD, several messages per call). We do not
      BRPOP: BRPOP removes the message before the client records it, so a
      ``kill -9`` between the two, or a reply lost on a broken link (a half-open
      socket, a server restart after the pop), loses the message for good, which
      kombu accepts and we do not. A busy consumer takes batches and never
      waits; an idle one is woken by the server (``redis_wake``: RESP3
      ``CLIENT TRACKING BCAST`` invalidations on the queues' key prefixes, so
      any client's LPUSH wakes it, in about a millisecond); where Redis refuses
      tracking (< 6.0) or ``wake_ups`` is False it polls every
      ``polling_interval``, backing off to ``polling_interval_max``.
    * ``ack`` = HDEL + ZREM (MULTI). ``reject(requeue=True)`` puts the message
      at the back of the queue it came from, once (Lua). ``maintain()`` sets the
      index score of every held message to now, so neither our restorer nor a
      kombu consumer's restores a live consumer's messages; it also restores
      messages whose score is older than ``visibility_timeout`` (their holder
      died) to the front of their queue, each once (Lua compare-and-move), under
      kombu's ``unacked_mutex`` lock (``SET NX PX``). ``close()`` gives held
      messages back at once; if the server is unreachable they stay in
      ``unacked`` and come back after the visibility timeout.
    * ``publish(delay=...)`` (``supports_delay``): one sorted set
      ``taskframe.delayed`` scored by due time; due messages move to their list
      in a Lua script (ZREM decides, so each moves once), from ``maintain()``
      and ``poll()`` of any consumer. Delayed messages are never held in memory.
    * Priorities: kombu's steps (``priority_steps``, default 0, 3, 6, 9; a
      priority goes to the largest step not above it) consumed lowest step
      first. DECISION: on Redis a LOWER number is MORE urgent, as in kombu and
      Celery, unlike ``Transport``'s AMQP direction. The number in an envelope
      must mean the same to every producer and consumer sharing the queue, and
      Celery code moving to taskframe keeps its Redis priorities; inverting the
      numbers would make a Celery client's default (0, the most urgent list)
      and a taskframe client's default land at opposite ends. The class
      attribute ``lower_priority_first`` says so to generic code.
    * Reconnection: every redis-py error is translated at this module's edge;
      a dropped link raises ``ConnectionLost`` from ``poll``/``ack``/...
      (``socket_timeout`` bounds a half-open socket), ``close()`` never
      blocks longer than the socket timeouts, and a new transport resumes on all
      its queues after ``consume``. Script caches lost in a restart are reloaded.

URLs:
    ``redis://[user:password@]host[:port][/db]``, ``rediss://...`` (TLS; the
    ``ssl`` option is a dict of redis-py ``ssl_*`` arguments),
    ``redis+socket:///path/to/redis.sock?virtual_host=<db>``,
    ``sentinel://[:password@]host:port[/db]`` with option ``master_name``
    (``redis+sentinel://`` too; each ``;``-separated URL is one sentinel).

Options (``broker_transport_options``):
    ``visibility_timeout`` (3600.0, kombu's default), ``socket_timeout`` (10.0:
    we never issue blocking commands, so a slower reply means a dead link),
    ``socket_connect_timeout`` (``connect_timeout``, 4.0),
    ``health_check_interval`` (25.0), ``retry_on_timeout`` (False), ``sep``,
    ``priority_steps``, ``queue_order_strategy`` (``round_robin`` (default),
    ``sorted`` or ``priority``), ``global_keyprefix`` (""), ``fanout_prefix``
    (True), ``fanout_patterns`` (True), ``unacked_key``, ``unacked_index_key``,
    ``unacked_mutex_key``, ``unacked_mutex_expire`` (300.0),
    ``unacked_restore_interval`` (min(10, visibility_timeout / 4)),
    ``unacked_restore_limit`` (100), ``polling_interval`` (0.005),
    ``polling_interval_max`` (0.1), ``wake_ups`` (True), ``max_batch`` (100), ``username``,
    ``password``, ``client_name``, ``master_name``, ``sentinel_kwargs``, ``ssl``.

Clocks: claim scores and due times use the clients' wall clocks, as kombu's.

Sharing a database with Celery workers: kombu never refreshes the claims of the
messages it holds, so any consumer whose ``visibility_timeout`` is shorter than a
Celery worker's task restores that task to another worker. Give both sides the same
``visibility_timeout`` (and ``global_keyprefix``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import redis
import redis.client
from redis.commands.core import Script

from . import redis_scripts as lua
from . import redis_upkeep as upkeep
from .base import Envelope, Message, MessageState, Transport
from .entities import Exchange, Queue
from .errors import BrokerConnectionError, DecodeError, ImproperlyConfigured, TransportError
from .redis_fanout import FanoutSubscriber
from .redis_layout import (
    DEFAULT_PRIORITY_STEPS,
    DEFAULT_SEP,
    FANOUT_PREFIX,
    UNACKED_INDEX_KEY,
    UNACKED_KEY,
    UNACKED_MUTEX_KEY,
    KeyLayout,
    build_client,
    decode_envelope,
    encode_envelope,
    mark_redelivered,
    ordered,
    queue_expires,
    text,
    topic_pattern,
    translate_errors,
)
from .redis_wake import Waker, wait_readable
from .url import safe_url

__all__ = ["RedisTransport"]

logger = logging.getLogger(__name__)

DEFAULT_VISIBILITY_TIMEOUT = 3600.0
# While the prefetch bound is reached, poll() waits this long at most so the
# caller's loop can settle messages instead of blocking for its whole timeout.
_FULL_WAIT = 0.05
# Delayed messages are looked for at most this often by poll() (maintain() always).
_PROMOTE_EVERY = 0.25
# kombu 5.7: a binding table of an expiring queue lives max(2 x x-expires, 1 h).
_MIN_BINDING_TTL_MS = 3_600_000
_CONTENT_INVALID = "application/x-taskframe-unreadable"


class RedisTransport(Transport):
    """A transport on Redis, compatible with kombu's (see the module docstring)."""

    schemes: ClassVar[tuple[str, ...]] = (
        "redis", "rediss", "redis+socket", "sentinel", "redis+sentinel",
    )
    supports_delay: ClassVar[bool] = True
    supports_fanout: ClassVar[bool] = True
    default_port: ClassVar[int | None] = 6379
    #: Redis priorities follow kombu: a lower number is consumed first.
    lower_priority_first: ClassVar[bool] = True

    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(url, options)
        opts = self.options
        self.visibility_timeout = float(opts.get("visibility_timeout", DEFAULT_VISIBILITY_TIMEOUT))
        steps = tuple(sorted(int(s) for s in opts.get("priority_steps", DEFAULT_PRIORITY_STEPS)))
        self._order = str(opts.get("queue_order_strategy", "round_robin"))
        if self._order not in ("round_robin", "sorted", "priority"):
            raise ImproperlyConfigured(f"unknown queue_order_strategy {self._order!r}")
        self._fanout_prefix_opt = opts.get("fanout_prefix", True)
        self._layout = KeyLayout(
            prefix=str(opts.get("global_keyprefix", "")),
            sep=str(opts.get("sep", DEFAULT_SEP)),
            steps=steps or DEFAULT_PRIORITY_STEPS,
            fanout_patterns=bool(opts.get("fanout_patterns", True)),
            unacked=str(opts.get("unacked_key", UNACKED_KEY)),
            unacked_index=str(opts.get("unacked_index_key", UNACKED_INDEX_KEY)),
            unacked_mutex=str(opts.get("unacked_mutex_key", UNACKED_MUTEX_KEY)),
        )
        self._mutex_expire = float(opts.get("unacked_mutex_expire", 300.0))
        self._restore_every = float(
            opts.get("unacked_restore_interval", min(10.0, self.visibility_timeout / 4))
        )
        self._restore_limit = int(opts.get("unacked_restore_limit") or 100)
        self._interval_min = float(opts.get("polling_interval", 0.005))
        self._interval_max = float(opts.get("polling_interval_max", 0.1))
        self._max_batch = int(opts.get("max_batch", 100))
        self._client: redis.Redis | None = None
        self._fanout: FanoutSubscriber | None = None
        self._waker: Waker | None = None
        self._waker_refused = not opts.get("wake_ups", True)
        self._scripts: dict[str, Script] = {}
        self._exchange_types: dict[str, str] = {}
        self._expires: dict[str, int] = {}  # queue -> x-expires ms
        self._bindings: dict[str, tuple[str, str, str]] = {}  # queue -> (exchange, rk, pattern)
        self._consumed: dict[str, Queue] = {}  # list-consumed queues, in order
        self._held: dict[str, str] = {}  # tag -> list key it was taken from
        self._acks_due: list[str] = []  # acked by ack_many, sent with the next claim
        self._prefetch = 0
        self._rotation = 0
        self._interval = self._interval_min
        self._refreshed_at = 0.0
        self._restored_at = 0.0
        self._promoted_at = 0.0
        self._bindings_refreshed_at = 0.0

    def __repr__(self) -> str:
        return f"<RedisTransport {self._safe_url()}>"

    def _safe_url(self) -> str:
        return safe_url(self.url)

    # -- connection -------------------------------------------------------------------

    def connect(self) -> None:
        if self._client is not None:
            return
        client, db = build_client(self.url, self.options)
        prefix = self._fanout_prefix_opt
        fanout = FANOUT_PREFIX.format(db=db) if prefix is True else (prefix or "")
        self._layout = dataclasses.replace(self._layout, fanout_prefix=str(fanout))
        try:
            with translate_errors(f"cannot connect to {self!r}", connecting=True):
                client.ping()
        except BaseException:
            client.close()
            raise
        self._client = client
        self._scripts = {
            name: client.register_script(source)
            for name, source in (
                ("claim", lua.CLAIM), ("requeue", lua.REQUEUE),
                ("restore", lua.RESTORE_EXPIRED), ("promote", lua.PROMOTE_DELAYED),
                ("refresh_binding", lua.REFRESH_BINDING), ("release", lua.RELEASE_LOCK),
            )
        }

    def close(self) -> None:
        client = self._client
        if client is None:
            return
        try:
            self._send_acks()
        except TransportError as exc:
            logger.warning("%r: could not ack %d message(s) (%s); they run again after the "
                           "visibility timeout (%.0f s)", self, len(self._acks_due), exc,
                           self.visibility_timeout)
        self._client = None
        if self._held:
            held, self._held = self._held, {}
            try:
                self._give_back(client, held)
            except TransportError as exc:
                logger.warning(
                    "%r: could not give back %d held message(s) (%s); they come back after "
                    "the visibility timeout (%.0f s)", self, len(held), exc,
                    self.visibility_timeout,
                )
        fanout, self._fanout = self._fanout, None
        try:
            self._drop_waker()
            if fanout is not None:
                fanout.close()
            client.close()
        except (redis.exceptions.RedisError, OSError) as exc:
            logger.debug("%r: closing: %s", self, exc)

    def _give_back(self, client: redis.Redis, held: Mapping[str, str]) -> None:
        layout = self._layout
        with translate_errors("giving back held messages"):
            values = client.hmget(layout.key(layout.unacked), list(held))
            for (tag, key), value in zip(held.items(), values, strict=True):
                if value is None:
                    continue
                raw = upkeep.stored_envelope(text(value))
                self._scripts["requeue"](
                    keys=[layout.key(layout.unacked), layout.key(layout.unacked_index), key],
                    args=[tag, mark_redelivered(raw), "RPUSH"], client=client,
                )

    @property
    def connected(self) -> bool:
        return self._client is not None

    def _redis(self) -> redis.Redis:
        if self._client is None:
            raise BrokerConnectionError(f"{self!r} is not connected")
        return self._client

    # -- topology -----------------------------------------------------------------------

    def declare(self, queue: Queue) -> None:
        client = self._redis()
        exchange = queue.bound_exchange
        expires = queue_expires(queue.arguments)
        if expires is not None:
            self._expires[queue.name] = expires
        else:
            self._expires.pop(queue.name, None)
        if not exchange.name:
            return
        self.declare_exchange(exchange)
        routing_key = queue.bound_routing_key
        pattern = topic_pattern(routing_key) if exchange.type == "topic" else ""
        self._bindings[queue.name] = (exchange.name, routing_key, pattern)
        self._write_binding(client, exchange.name, routing_key, pattern, queue.name)

    def _write_binding(
        self, client: redis.Redis | redis.client.Pipeline, exchange: str, routing_key: str,
        pattern: str, queue: str,
    ) -> None:
        layout = self._layout
        member = layout.member(routing_key, pattern, queue)
        with translate_errors(f"binding {queue!r} to {exchange!r}"):
            if queue in self._expires:
                ttl = max(self._expires[queue] * 2, _MIN_BINDING_TTL_MS)
                self._scripts["refresh_binding"](
                    keys=[layout.binding_key(exchange), layout.binding_deadlines_key],
                    args=[member, exchange, ttl], client=client,
                )
            else:
                pipe = client.pipeline()
                pipe.sadd(layout.binding_key(exchange), member)
                pipe.sadd(layout.binding_permanent_key(exchange), member)
                pipe.execute()

    def declare_exchange(self, exchange: Exchange) -> None:
        if exchange.name:
            self._exchange_types[exchange.name] = exchange.type

    # -- publishing -----------------------------------------------------------------------

    def publish(
        self,
        envelope: Envelope,
        *,
        exchange: str,
        routing_key: str,
        delay: float | None = None,
    ) -> None:
        client = self._redis()
        layout = self._layout
        try:
            priority = int(envelope.properties.get("priority") or 0)
        except (TypeError, ValueError):
            priority = 0
        where = f"{exchange!r}/{routing_key!r}"
        if self._exchange_types.get(exchange) == "fanout":
            payload = encode_envelope(envelope, exchange, routing_key, priority)
            with translate_errors(f"publishing to {where}"):
                client.publish(layout.fanout_channel(exchange, routing_key), payload)
            return
        queues = [routing_key] if not exchange else self._route(client, exchange, routing_key)
        if not queues:
            logger.warning("%r: no queue bound for %s; message dropped", self, where)
            return
        step = layout.step(priority)
        due = time.time() + delay if delay and delay > 0 else None
        with translate_errors(f"publishing to {where}"):
            pipe = client.pipeline(transaction=False)
            for queue in queues:
                # One tag per copy: copies in two queues are held and settled apart.
                payload = encode_envelope(envelope, exchange, routing_key, priority)
                name = layout.list_name(queue, step)
                if due is not None:
                    pipe.zadd(layout.delayed_key, {f"{name}\n{payload}": due})
                else:
                    pipe.lpush(layout.key(name), payload)
                self._touch_expiring(pipe, queue)
            pipe.execute()

    def _route(self, client: redis.Redis, exchange: str, routing_key: str) -> list[str]:
        with translate_errors(f"reading the bindings of {exchange!r}"):
            return upkeep.route(client, self._layout, self._exchange_types.get(exchange),
                                exchange, routing_key)

    def _touch_expiring(self, pipe: redis.client.Pipeline, queue: str) -> None:
        expires = self._expires.get(queue)
        if expires is not None:
            for key in self._layout.list_keys(queue):
                pipe.pexpire(key, expires)

    # -- consuming ------------------------------------------------------------------------

    def consume(self, queues: Sequence[Queue], *, prefetch_count: int = 0) -> None:
        for queue in queues:
            self.declare(queue)
            exchange = queue.bound_exchange
            if exchange.type == "fanout" and exchange.name:
                pattern = self._layout.fanout_channel(
                    exchange.name, queue.bound_routing_key.replace("#", "*"))
                with translate_errors("subscribing to a fanout exchange"):
                    if self._fanout is None:
                        self._fanout = FanoutSubscriber(self._redis())
                    self._fanout.add(pattern, queue.name)
            elif queue.name not in self._consumed:
                self._consumed[queue.name] = queue
                self._drop_waker()  # reopened for the new set of queues
        self._prefetch = prefetch_count

    def cancel(self, queue_name: str) -> None:
        if self._consumed.pop(queue_name, None) is not None:
            self._drop_waker()
        if self._fanout is not None:
            with translate_errors("unsubscribing from a fanout exchange"):
                self._fanout.remove(queue_name)

    def set_prefetch(self, prefetch_count: int) -> None:
        self._prefetch = prefetch_count

    def poll(self, timeout: float | None = None) -> list[Message]:
        self._redis()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            messages = self._receive_fanout(0.0)
            if time.monotonic() - self._promoted_at >= _PROMOTE_EVERY:
                self._promote()
            room = self._max_batch if self._prefetch <= 0 else self._prefetch - len(self._held)
            full = room <= 0 and bool(self._consumed)
            if not full and self._consumed:
                messages += self._claim(min(room, self._max_batch))
            elif self._acks_due:
                self._send_acks()
            if messages or full:
                self._disarm()
            if messages:
                self._interval = self._interval_min
                return messages
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return []
            if full:
                time.sleep(_FULL_WAIT if remaining is None else min(_FULL_WAIT, remaining))
                return []
            self._wait(remaining)

    def _wait(self, remaining: float | None) -> None:
        """Sleep until a consumed list or fanout subscription may have something.

        With a ``Waker`` the wait ends on a push from the server and lasts at most
        ``_PROMOTE_EVERY``; without one it is the polling back-off.
        """
        with translate_errors("waiting for messages"):
            waker = self._waker
            if waker is None and self._consumed and not self._waker_refused:
                self._waker = Waker.open(self._redis(), map(self._layout.key, self._consumed))
                self._waker_refused = self._waker is None
                if self._waker is not None:
                    return  # take once more: something may have come before the pushes
            if waker is not None and not waker.armed:
                waker.arm()
                return  # likewise
            if waker is not None:
                wait = _PROMOTE_EVERY
            else:
                wait = self._interval
                self._interval = min(self._interval * 2, self._interval_max)
            if remaining is not None:
                wait = min(wait, remaining)
            fanout = self._fanout if self._fanout else None
            if waker is None and fanout is None:
                time.sleep(wait)
                return
            ready = (waker is not None and waker.pending()) or (
                fanout is not None and fanout.pending())
            if not ready:
                wait_readable([waker.socket() if waker else None,
                               fanout.socket() if fanout else None], wait)
            if waker is not None:
                waker.drain()

    def _disarm(self) -> None:
        if self._waker is not None and self._waker.armed:
            with translate_errors("pausing wake-ups"):
                self._waker.disarm()

    def _drop_waker(self) -> None:
        waker, self._waker = self._waker, None
        if waker is not None:
            waker.close()

    def _list_keys(self) -> tuple[list[str], list[str]]:
        """The lists to take from, in order, and the queue name of each."""
        names = list(self._consumed)
        if self._order == "round_robin":
            names = ordered(names, self._rotation)
            self._rotation += 1
        elif self._order == "sorted":
            names.sort()
        layout = self._layout
        keys: list[str] = []
        queues: list[str] = []
        for step in layout.steps:
            for name in names:
                keys.append(layout.key(layout.list_name(name, step)))
                queues.append(name)
        return keys, queues

    def _claim(self, limit: int) -> list[Message]:
        client = self._redis()
        layout = self._layout
        keys, queues = self._list_keys()
        acks = self._acks_due
        with translate_errors("taking messages"):
            reply = self._scripts["claim"](
                keys=[layout.key(layout.unacked), layout.key(layout.unacked_index), *keys],
                args=[limit, time.time(), f"taskframe-{uuid.uuid4()}-", len(acks), *acks,
                      *queues],
                client=client,
            )
            self._acks_due = []
            lost = int(reply[0])
            for tag in reply[1:1 + lost]:
                self._warn_lost("ack", text(tag))
            reply = reply[1 + lost:]
            if self._expires:
                pipe = client.pipeline(transaction=False)
                for name in {queues[int(reply[i + 2]) - 1] for i in range(0, len(reply), 3)}:
                    self._touch_expiring(pipe, name)
                pipe.execute()
        messages = []
        for i in range(0, len(reply), 3):
            tag, raw, index = text(reply[i]), text(reply[i + 1]), int(reply[i + 2]) - 1
            self._held[tag] = keys[index]
            messages.append(self._to_message(tag, raw, queues[index]))
        return messages

    def _to_message(self, tag: str, raw: str, queue: str) -> Message:
        try:
            env = decode_envelope(raw)
        except DecodeError as exc:
            logger.error("%r: unreadable message in %r (%s); handing it on as %s",
                         self, queue, exc, _CONTENT_INVALID)
            return Message(self, body=raw.encode("utf-8"), delivery_tag=tag,
                           content_type=_CONTENT_INVALID, content_encoding="binary",
                           delivery_info={"exchange": "", "routing_key": queue, "priority": 0,
                                          "redelivered": False, "queue": queue})
        return Message(
            self, body=env.body, delivery_tag=tag, content_type=env.content_type,
            content_encoding=env.content_encoding, headers=env.headers,
            properties=env.properties,
            delivery_info={"exchange": env.exchange, "routing_key": env.routing_key,
                           "priority": env.priority, "redelivered": env.redelivered,
                           "queue": queue},
        )

    def _receive_fanout(self, wait: float) -> list[Message]:
        if not self._fanout:
            return []
        with translate_errors("receiving fanout messages"):
            received = self._fanout.receive(wait)
        return [
            Message(self, body=env.body, delivery_tag=env.tag or str(uuid.uuid4()),
                    content_type=env.content_type, content_encoding=env.content_encoding,
                    headers=env.headers, properties=env.properties,
                    delivery_info={"exchange": env.exchange, "routing_key": env.routing_key,
                                   "priority": env.priority, "redelivered": False,
                                   "queue": queue})
            for queue, env in received
        ]

    def ack(self, message: Message) -> None:
        self._forget(message, "ack")

    def ack_many(self, messages: Sequence[Message]) -> None:
        """Ack held messages; the acks reach Redis with the next claim, in its script.

        py-spy on a no-op drain showed one pipeline round trip per ack taking a third
        of the consumer's time, then (batched in one MULTI/EXEC) a fifth, next to the
        claim's own round trip. Now the ZREM and HDEL of each tag run at the start of
        the claim script, or on their own (``_send_acks``) when no claim comes first:
        a poll that takes nothing, ``maintain()``, ``close()``. Until then the messages
        are no longer refreshed; a crash in between runs them again, as a lost ack would.
        """
        if len(messages) == 1:
            messages[0].ack()
            return
        for message in messages:
            message._check_unsettled()
        for message in messages:
            tag = str(message.delivery_tag)
            if self._held.pop(tag, None) is not None:
                self._acks_due.append(tag)
            message.state = MessageState.ACKED

    def _send_acks(self) -> None:
        """Send the acks that ``ack_many`` keeps for the next claim, in one MULTI/EXEC."""
        if not self._acks_due:
            return
        client = self._redis()
        layout = self._layout
        unacked = layout.key(layout.unacked)
        acks, self._acks_due = self._acks_due, []
        with translate_errors(f"ack of {len(acks)} message(s)"):
            pipe = client.pipeline()
            pipe.zrem(layout.key(layout.unacked_index), *acks)
            for tag in acks:
                pipe.hdel(unacked, tag)
            removed = pipe.execute()[1:]
        for tag, count in zip(acks, removed, strict=True):
            if not count:
                self._warn_lost("ack", tag)

    def reject(self, message: Message, *, requeue: bool) -> None:
        if not requeue:
            self._forget(message, "reject")
            return
        tag = str(message.delivery_tag)
        key = self._held.get(tag)
        if key is None:
            return  # a fanout message: nothing is held
        client = self._redis()
        layout = self._layout
        try:
            with translate_errors(f"requeue of message {tag}"):
                value = client.hget(layout.key(layout.unacked), tag)
                done = 0
                if value is not None:
                    done = self._scripts["requeue"](
                        keys=[layout.key(layout.unacked), layout.key(layout.unacked_index), key],
                        args=[tag, mark_redelivered(upkeep.stored_envelope(text(value))), "LPUSH"],
                        client=client,
                    )
        finally:
            del self._held[tag]
        if not done:
            self._warn_lost("requeue", tag)

    def _forget(self, message: Message, action: str) -> None:
        tag = str(message.delivery_tag)
        if tag not in self._held:
            return  # a fanout message: nothing is held
        client = self._redis()
        layout = self._layout
        try:
            with translate_errors(f"{action} of message {tag}"):
                pipe = client.pipeline()
                pipe.zrem(layout.key(layout.unacked_index), tag)
                pipe.hdel(layout.key(layout.unacked), tag)
                _, removed = pipe.execute()
        finally:
            # Not refreshed any more: if the ack did not land, the message is restored
            # after the visibility timeout instead of being held forever.
            del self._held[tag]
        if not removed:
            self._warn_lost(action, tag)

    def _warn_lost(self, action: str, tag: str) -> None:
        logger.warning(
            "%r: %s of message %s: it was no longer held (restored after the visibility "
            "timeout of %.1f s?); another consumer may run it again",
            self, action, tag, self.visibility_timeout,
        )

    # -- upkeep ---------------------------------------------------------------------------

    def maintain(self) -> None:
        """Keep held claims fresh, move due delayed messages, restore expired ones.

        Claims are refreshed at most every tenth of the visibility timeout; expired
        messages are looked for every ``unacked_restore_interval`` seconds.
        """
        client = self._redis()
        self._send_acks()  # the loop may not poll for long (all its work reserved)
        now = time.time()
        if self._held and now - self._refreshed_at >= min(self.visibility_timeout / 10, 30.0):
            self._refresh_claims(client, now)
        self._promote()
        if now - self._restored_at >= self._restore_every:
            self._restored_at = now
            self.restore_expired()
        if self._expires and now - self._bindings_refreshed_at >= 600.0:
            self._bindings_refreshed_at = now
            for queue, (exchange, routing_key, pattern) in self._bindings.items():
                if queue in self._expires:
                    self._write_binding(client, exchange, routing_key, pattern, queue)

    def _refresh_claims(self, client: redis.Redis, now: float) -> None:
        with translate_errors("refreshing claims"):
            changed = upkeep.refresh_claims(client, self._layout, self._held, now)
        self._refreshed_at = now
        if changed < len(self._held):
            logger.warning("%r: %d held message(s) lost their claim; another consumer may "
                           "run them", self, len(self._held) - changed)

    def _promote(self) -> None:
        client = self._redis()
        self._promoted_at = time.monotonic()
        with translate_errors("moving due delayed messages"):
            upkeep.promote_delayed(client, self._layout, self._scripts["promote"])

    def restore_expired(self) -> int:
        """Give back messages held longer than ``visibility_timeout``; return how many.

        Runs under kombu's ``unacked_mutex`` so one consumer at a time scans;
        each message is moved by a compare-and-move script, so at most once.
        """
        client = self._redis()
        with translate_errors("restoring expired messages"):
            return upkeep.restore_expired(
                client, self._layout, self._scripts, visibility_timeout=self.visibility_timeout,
                limit=self._restore_limit, mutex_expire=self._mutex_expire,
                exchange_types=self._exchange_types,
            )

    # -- administration -------------------------------------------------------------------

    def purge(self, queue_name: str) -> int:
        client = self._redis()
        with translate_errors(f"purging {queue_name!r}"):
            pipe = client.pipeline()
            for key in self._layout.list_keys(queue_name):
                pipe.llen(key)
                pipe.delete(key)
            replies = pipe.execute()
        return sum(int(n) for n in replies[::2])

    def queue_size(self, queue_name: str) -> int:
        client = self._redis()
        with translate_errors(f"counting {queue_name!r}"):
            pipe = client.pipeline(transaction=False)
            for key in self._layout.list_keys(queue_name):
                pipe.llen(key)
            return sum(int(n) for n in pipe.execute())
