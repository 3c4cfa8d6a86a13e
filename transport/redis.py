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
    * A delivery belongs to the transport, not to its socket
      (``keeps_deliveries``): after ``drop()`` (a failed link) the held messages
      stay held; the acks, rejects and requeues that could not be written wait
      and ``connect()`` writes them, then renews every claim (``Claims.resume``).
    * Failed deliveries (``Message.delivery_count``): the envelope property
      ``x-taskframe-failed-deliveries`` (kombu ignores it) counts our restores of
      expired messages and ``requeue_failed``, not a requeue, ``close()`` or a kombu
      restore. ``dead_letter`` pushes to queue ``<queue>.dead`` (count dropped).
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
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import redis
from redis.commands.core import Script

from . import redis_scripts as lua
from . import redis_upkeep as upkeep
from .base import Envelope, Message, Transport
from .entities import Exchange, Queue, dead_letter_queue
from .errors import BrokerConnectionError, ImproperlyConfigured, TransportError
from .redis_bindings import Bindings
from .redis_claims import Claims
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
    encode_envelope,
    ordered,
    text,
    translate_errors,
)
from .redis_messages import fanout_message, list_message
from .redis_wake import IdleWait
from .url import safe_url

__all__ = ["RedisTransport"]

logger = logging.getLogger(__name__)

DEFAULT_VISIBILITY_TIMEOUT = 3600.0
# While the prefetch bound is reached, poll() waits this long at most so the
# caller's loop can settle messages instead of blocking for its whole timeout.
_FULL_WAIT = 0.05
# Delayed messages are looked for at most this often by poll() (maintain() always).
_PROMOTE_EVERY = 0.25


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
    #: A held message is a claim in ``unacked``; it outlives the socket (see ``drop``).
    keeps_deliveries: ClassVar[bool] = True
    acks_from_any_thread = True  # ``Claims`` holds its lock in every method

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
        interval_min = float(opts.get("polling_interval", 0.005))
        interval_max = float(opts.get("polling_interval_max", 0.1))
        self._max_batch = int(opts.get("max_batch", 100))
        self._client: redis.Redis | None = None
        self._fanout: FanoutSubscriber | None = None
        self._scripts: dict[str, Script] = {}
        # The parts below keep this layout: connect() changes only its fanout channels.
        self._bindings = Bindings(self._layout)
        self._claims = Claims(self._layout, self.visibility_timeout, repr(self))
        self._idle = IdleWait(interval_min, interval_max,
                              wake_ups=bool(opts.get("wake_ups", True)), longest=_PROMOTE_EVERY)
        self._consumed: dict[str, Queue] = {}  # list-consumed queues, in order
        self._prefetch = 0
        self._rotation = 0
        self._restored_at = 0.0
        self._promoted_at = 0.0

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
        self._scripts = lua.register(client)
        try:  # after drop(): what we held is still ours (see keeps_deliveries)
            self._claims.resume(client, self._scripts, self._bindings.exchange_types)
        except TransportError as exc:
            self._client = None
            client.close()
            raise BrokerConnectionError(f"{self!r}: settling after reconnecting: {exc}") from exc

    def close(self) -> None:
        client = self._client
        if client is None:
            self._claims.abandon()  # dropped and never connected again
            return
        self._claims.release(client, self._scripts["requeue"])
        self.drop()

    def drop(self) -> None:
        """Let the link go, keeping the held messages (``connect()`` resumes them)."""
        client, self._client = self._client, None
        fanout, self._fanout = self._fanout, None
        try:
            self._idle.drop()
            if fanout is not None:
                fanout.close()
            if client is not None:
                client.close()
        except (redis.exceptions.RedisError, OSError) as exc:
            logger.debug("%r: closing: %s", self, exc)

    @property
    def connected(self) -> bool:
        return self._client is not None

    def _redis(self) -> redis.Redis:
        if self._client is None:
            raise BrokerConnectionError(f"{self!r} is not connected")
        return self._client

    # -- topology -----------------------------------------------------------------------

    def declare(self, queue: Queue) -> None:
        self._bindings.declare(self._redis(), self._scripts["refresh_binding"], queue)

    def declare_exchange(self, exchange: Exchange) -> None:
        self._bindings.declare_exchange(exchange)

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
        bindings = self._bindings
        try:
            priority = int(envelope.properties.get("priority") or 0)
        except (TypeError, ValueError):
            priority = 0
        where = f"{exchange!r}/{routing_key!r}"
        if bindings.exchange_types.get(exchange) == "fanout":
            payload = encode_envelope(envelope, exchange, routing_key, priority)
            with translate_errors(f"publishing to {where}"):
                client.publish(layout.fanout_channel(exchange, routing_key), payload)
            return
        queues = [routing_key] if not exchange else bindings.route(client, exchange, routing_key)
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
                bindings.touch(pipe, queue)
            pipe.execute()

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
                self._idle.drop()  # reopened for the new set of queues
        self._prefetch = prefetch_count

    def cancel(self, queue_name: str) -> None:
        if self._consumed.pop(queue_name, None) is not None:
            self._idle.drop()
        if self._fanout is not None:
            with translate_errors("unsubscribing from a fanout exchange"):
                self._fanout.remove(queue_name)

    def set_prefetch(self, prefetch_count: int) -> None:
        self._prefetch = prefetch_count

    def poll(self, timeout: float | None = None) -> list[Message]:
        client = self._redis()
        claims = self._claims
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            messages = self._receive_fanout(0.0)
            if time.monotonic() - self._promoted_at >= _PROMOTE_EVERY:
                self._promote()
            room = self._max_batch if self._prefetch <= 0 else self._prefetch - len(claims.held)
            full = room <= 0 and bool(self._consumed)
            if not full and self._consumed:
                messages += self._claim(client, min(room, self._max_batch))
            elif claims.acks_due:
                claims.send_acks(client)
            if messages:
                self._idle.busy()
                return messages
            if full:
                self._idle.pause()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return []
            if full:
                time.sleep(_FULL_WAIT if remaining is None else min(_FULL_WAIT, remaining))
                return []
            fanout = self._fanout if self._fanout else None
            prefixes = [self._layout.key(name) for name in self._consumed]
            self._idle.wait(client, prefixes, fanout, remaining)

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

    def _claim(self, client: redis.Redis, limit: int) -> list[Message]:
        keys, queues = self._list_keys()
        reply = self._claims.claim(client, self._scripts["claim"], keys, queues, limit)
        if self._bindings.expires:
            with translate_errors("taking messages"):
                pipe = client.pipeline(transaction=False)
                for name in {queues[int(reply[i + 2]) - 1] for i in range(0, len(reply), 3)}:
                    self._bindings.touch(pipe, name)
                pipe.execute()
        held = self._claims.held
        messages = []
        for i in range(0, len(reply), 3):
            tag, raw, index = text(reply[i]), text(reply[i + 1]), int(reply[i + 2]) - 1
            held[tag] = keys[index]
            messages.append(list_message(self, tag, raw, queues[index]))
        return messages

    def _receive_fanout(self, wait: float) -> list[Message]:
        if not self._fanout:
            return []
        with translate_errors("receiving fanout messages"):
            received = self._fanout.receive(wait)
        return [fanout_message(self, queue, env) for queue, env in received]

    def ack(self, message: Message) -> None:
        tag = str(message.delivery_tag)
        if tag in self._claims.held:  # else a fanout message: nothing is held
            self._claims.forget(self._client, tag, "ack")

    def ack_many(self, messages: Sequence[Message]) -> None:
        """Ack held messages; the acks reach Redis with the next claim (``Claims.ack_later``)."""
        if len(messages) == 1:
            messages[0].ack()
            return
        self._claims.ack_later(messages)

    def ack_early(self, messages: Sequence[Message]) -> None:
        """Write the acks now, with those due; read the replies later (``Claims.ack_early``)."""
        self._claims.ack_early(self._client, messages)

    def reject(self, message: Message, *, requeue: bool) -> None:
        tag = str(message.delivery_tag)
        if tag not in self._claims.held:
            return  # a fanout message: nothing is held
        if requeue:
            self._claims.requeue(self._client, self._scripts["requeue"], tag)
        else:
            self._claims.forget(self._client, tag, "reject")

    def requeue_failed(self, message: Message) -> None:
        tag = str(message.delivery_tag)
        if tag in self._claims.held:
            self._claims.requeue(self._client, self._scripts["requeue"], tag, how="failed")

    def dead_letter(self, message: Message) -> str | None:
        tag = str(message.delivery_tag)
        if tag not in self._claims.held:
            return None  # a fanout message: nothing is held
        dead = dead_letter_queue(str(message.delivery_info.get("queue")))
        self._claims.requeue(self._client, self._scripts["requeue"], tag, how="dead",
                             dead=self._layout.key(dead))
        return dead

    # -- upkeep ---------------------------------------------------------------------------

    def maintain(self) -> None:
        """Keep held claims fresh, move due delayed messages, restore expired ones.

        Claims are refreshed at most every tenth of the visibility timeout; expired
        messages are looked for every ``unacked_restore_interval`` seconds.
        """
        client = self._redis()
        self._claims.send_acks(client)  # the loop may not poll for long (all its work reserved)
        now = time.time()
        self._claims.refresh(client, now)
        self._promote()
        if now - self._restored_at >= self._restore_every:
            self._restored_at = now
            self.restore_expired()
        self._bindings.refresh(client, self._scripts["refresh_binding"], now)

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
                exchange_types=self._bindings.exchange_types,
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
