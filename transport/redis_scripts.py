"""Lua scripts of the Redis transport: each one runs atomically on the server.

They take every key through ``KEYS`` (already carrying ``global_keyprefix``)
and know no key names themselves: the names live in the constants block of
``transport.redis_layout``. Scores and deadlines are the clients' wall
clocks (as kombu's), passed in ``ARGV``.

A Redis script is not rolled back when it fails half-way, so each script
checks what it reads (``pcall`` around JSON decoding) before it writes.
"""

from __future__ import annotations

import redis
from redis.commands.core import Script

__all__ = [
    "CLAIM",
    "PROMOTE_DELAYED",
    "REFRESH_BINDING",
    "RELEASE_LOCK",
    "REQUEUE",
    "RESTORE_EXPIRED",
    "register",
]

#: Ack, then claim. First removes the ARGV[4] tags ARGV[5..4+n] from the unacked
#: hash KEYS[1] and index KEYS[2] (the acks of the caller's last batch, so that they
#: cost no round trip of their own). Then pops up to ARGV[1] messages from the
#: lists KEYS[3..] (in that order: the caller puts them priority-major) and records
#: each in the hash and index with score ARGV[2], in kombu's format
#: ``[envelope, exchange, routing_key]``. ARGV[3] prefixes the tags made up for
#: envelopes without one; ARGV[4 + n + i - 2] is the queue name of KEYS[i], used as
#: routing key when an envelope cannot be read. Returns a flat list: the number of
#: acked tags that were no longer held, those tags, then ``tag, envelope, key
#: index, ...`` per message taken. Pop and record are one step, so a message is
#: always in a list or in the unacked hash, never only in flight.
CLAIM = """
local limit = tonumber(ARGV[1])
local nacks = tonumber(ARGV[4])
local lost = {}
for j = 5, 4 + nacks do
    redis.call('ZREM', KEYS[2], ARGV[j])
    if redis.call('HDEL', KEYS[1], ARGV[j]) == 0 then lost[#lost + 1] = ARGV[j] end
end
local out = {#lost}
for _, tag in ipairs(lost) do out[#out + 1] = tag end
local taken = 0
for i = 3, #KEYS do
    while taken < limit do
        local raw = redis.call('RPOP', KEYS[i])
        if not raw then break end
        taken = taken + 1
        local tag, exchange, routing_key
        local ok, envelope = pcall(cjson.decode, raw)
        if ok and type(envelope) == 'table' and type(envelope['properties']) == 'table' then
            local props = envelope['properties']
            tag = props['delivery_tag']
            local info = props['delivery_info']
            if type(info) == 'table' then
                exchange = info['exchange']
                routing_key = info['routing_key']
            end
        end
        if type(tag) ~= 'string' or tag == '' then tag = ARGV[3] .. taken end
        if type(exchange) ~= 'string' then exchange = '' end
        if type(routing_key) ~= 'string' then routing_key = ARGV[i + 2 + nacks] end
        redis.call('ZADD', KEYS[2], ARGV[2], tag)
        redis.call('HSET', KEYS[1], tag, '[' .. raw .. ', ' .. cjson.encode(exchange)
            .. ', ' .. cjson.encode(routing_key) .. ']')
        out[#out + 1] = tag
        out[#out + 1] = raw
        out[#out + 1] = i - 2
    end
    if taken >= limit then break end
end
return out
"""

#: Settle-and-put-back of one held message, once: if tag ARGV[1] is still in
#: the unacked hash KEYS[1], remove it (and from index KEYS[2]) and push
#: ARGV[2] onto every list KEYS[3..]; ARGV[3] is ``LPUSH`` (back of the
#: queue, a requeue) or ``RPUSH`` (front, a release). Returns 1 when it did.
REQUEUE = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then
    redis.call('ZREM', KEYS[2], ARGV[1])
    return 0
end
redis.call('ZREM', KEYS[2], ARGV[1])
for i = 3, #KEYS do
    redis.call(ARGV[3], KEYS[i], ARGV[2])
end
return 1
"""

#: Restore one expired message, once: only if tag ARGV[1] still has an index
#: score (KEYS[2]) at or below ARGV[3] and its unacked value (KEYS[1]) is still
#: exactly ARGV[2] (no ack, refresh or other restorer came first), push ARGV[4]
#: to the front (RPUSH, as kombu) of every list KEYS[3..] and drop the record.
#: An index entry whose hash entry is gone is dropped. Returns 1 when restored.
RESTORE_EXPIRED = """
local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[3]) then return 0 end
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then
    redis.call('ZREM', KEYS[2], ARGV[1])
    return 0
end
if current ~= ARGV[2] then return 0 end
for i = 3, #KEYS do
    redis.call('RPUSH', KEYS[i], ARGV[4])
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""

#: Move up to ARGV[2] delayed messages due at ARGV[1] from the sorted set
#: KEYS[1] to their lists (LPUSH: a fresh publish). A member is
#: ``<list key without global prefix> "\\n" <envelope>`` (an envelope is JSON
#: without raw newlines, so the last newline separates); ARGV[3] is the global
#: key prefix. ZREM decides who moves a member, so each moves once.
PROMOTE_DELAYED = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local moved = 0
for _, member in ipairs(due) do
    if redis.call('ZREM', KEYS[1], member) == 1 then
        local key, envelope = string.match(member, '^(.*)\\n([^\\n]*)$')
        if key then
            redis.call('LPUSH', ARGV[3] .. key, envelope)
            moved = moved + 1
        end
    end
end
return moved
"""

#: kombu 5.7's binding refresh, for queues declared with x-expires: add member
#: ARGV[1] to binding table KEYS[1] and raise exchange ARGV[2]'s deadline in
#: KEYS[2] to ARGV[3] ms from now by the server clock (ZADD GT).
REFRESH_BINDING = """
redis.call('SADD', KEYS[1], ARGV[1])
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZADD', KEYS[2], 'GT', ms + tonumber(ARGV[3]), ARGV[2])
return 1
"""

#: Delete lock KEYS[1] only if it still holds our token ARGV[1].
RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


def register(client: redis.Redis) -> dict[str, Script]:
    """Every script registered with ``client`` (no round trip), by the name callers use."""
    return {
        name: client.register_script(source)
        for name, source in (
            ("claim", CLAIM), ("requeue", REQUEUE),
            ("restore", RESTORE_EXPIRED), ("promote", PROMOTE_DELAYED),
            ("refresh_binding", REFRESH_BINDING), ("release", RELEASE_LOCK),
        )
    }
