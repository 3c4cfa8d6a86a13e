"""kombu's Redis layout as ``redis_layout`` writes it: keys, steps, envelope, URLs (no server)."""

from __future__ import annotations

import base64
import json

import pytest
from kombu.transport.redis import Channel
from kombu.transport.virtual.exchange import TopicExchange

from taskframe.transport import Envelope
from taskframe.transport.errors import DecodeError, ImproperlyConfigured
from taskframe.transport.redis import RedisTransport
from taskframe.transport.redis_layout import (
    KeyLayout,
    build_client,
    decode_envelope,
    encode_envelope,
    mark_dead,
    mark_redelivered,
    topic_pattern,
)

SEP = "\x06\x16"


@pytest.mark.parametrize("priority", range(-2, 13))
def test_priority_steps_are_kombus(priority: int) -> None:
    layout = KeyLayout()
    # kombu: clamp to 0..9, then the largest step not above it.
    clamped = max(min(priority, 9), 0)
    expected = Channel.priority(Channel.__new__(Channel), clamped)
    assert layout.step(priority) == expected


def test_list_names_and_prefix() -> None:
    layout = KeyLayout(prefix="p:")
    assert layout.list_name("celery", 0) == "celery"
    assert layout.list_name("celery", 3) == f"celery{SEP}3"
    assert layout.list_keys("q") == ["p:q", f"p:q{SEP}3", f"p:q{SEP}6", f"p:q{SEP}9"]
    assert layout.binding_key("celery") == "p:_kombu.binding.celery"
    assert layout.binding_permanent_key("celery") == "p:_kombu.binding_permanent.celery"
    assert layout.member("celery", "", "celery") == f"celery{SEP}{SEP}celery"
    assert layout.parse_member(f"a{SEP}b{SEP}c") == ("a", "b", "c")
    assert layout.parse_member("junk") is None


def test_fanout_channel_names() -> None:
    layout = KeyLayout(fanout_prefix="/0.")
    assert layout.fanout_channel("celery.pidbox", "") == "/0.celery.pidbox"
    assert layout.fanout_channel("celeryev", "worker.*") == "/0.celeryev/worker.*"
    flat = KeyLayout(fanout_prefix="/0.", fanout_patterns=False)
    assert flat.fanout_channel("celeryev", "worker.*") == "/0.celeryev"


@pytest.mark.parametrize("key", ["a.b", "job.*", "job.#", "*.x.#", "#"])
def test_topic_patterns_are_kombus(key: str) -> None:
    assert topic_pattern(key) == TopicExchange(None).key_to_pattern(key)


def test_envelope_has_kombus_shape_and_round_trips() -> None:
    envelope = Envelope(body=b"\xff\x00[1]", content_type="application/x-msgpack",
                        content_encoding="binary", headers={"task": "t"},
                        properties={"correlation_id": "c", "delivery_tag": "old"})
    raw = encode_envelope(envelope, "ex", "rk", 5, tag="tag-1")
    data = json.loads(raw)
    assert list(data) == ["body", "content-encoding", "content-type", "headers", "properties"]
    assert base64.b64decode(data["body"]) == b"\xff\x00[1]"
    assert data["properties"] == {
        "correlation_id": "c", "delivery_info": {"exchange": "ex", "routing_key": "rk"},
        "priority": 5, "body_encoding": "base64", "delivery_tag": "tag-1",
    }
    decoded = decode_envelope(raw)
    assert (decoded.body, decoded.content_type, decoded.content_encoding) == (
        b"\xff\x00[1]", "application/x-msgpack", "binary")
    assert decoded.properties == {"correlation_id": "c", "priority": 5}
    assert (decoded.exchange, decoded.routing_key, decoded.priority, decoded.tag) == (
        "ex", "rk", 5, "tag-1")
    assert decoded.redelivered is False
    assert decode_envelope(mark_redelivered(raw)).redelivered is True


def test_text_bodies_and_bad_envelopes() -> None:
    plain = json.dumps({"body": "hi", "properties": {"body_encoding": "utf-8", "priority": 42}})
    decoded = decode_envelope(plain)
    assert (decoded.body, decoded.priority) == (b"hi", 9)
    with pytest.raises(DecodeError):
        decode_envelope("not json")
    with pytest.raises(DecodeError):
        decode_envelope("[1, 2]")
    assert mark_redelivered("not json") == "not json"


def test_urls_pick_database_credentials_and_socket() -> None:
    client, db = build_client("redis://user:secret@127.0.0.1:6390/5", {"socket_timeout": 3})
    kwargs = client.connection_pool.connection_kwargs
    assert (db, kwargs["db"], kwargs["port"], kwargs["username"], kwargs["password"]) == (
        5, 5, 6390, "user", "secret")
    assert kwargs["socket_timeout"] == 3.0
    client.close()
    client, db = build_client("redis+socket:///tmp/redis.sock?virtual_host=2", {})
    assert client.connection_pool.connection_kwargs["path"] == "/tmp/redis.sock"
    assert db == 2
    client.close()
    client, _ = build_client("rediss://127.0.0.1:6380/0", {})
    assert client.connection_pool.connection_class.__name__ == "SSLConnection"
    client.close()


def test_bad_urls_and_options_are_refused() -> None:
    with pytest.raises(ImproperlyConfigured):
        build_client("redis://127.0.0.1/notanumber", {})
    with pytest.raises(ImproperlyConfigured):
        build_client("sentinel://127.0.0.1:26379", {})
    with pytest.raises(ImproperlyConfigured):
        RedisTransport("redis://", {"queue_order_strategy": "random"})


def test_transport_declares_its_capabilities() -> None:
    assert RedisTransport.supports_delay and RedisTransport.supports_fanout
    assert RedisTransport.lower_priority_first


def test_failed_deliveries_are_a_property_kombu_ignores() -> None:
    raw = encode_envelope(Envelope(b"[1]", headers={"id": "x"}), "", "q", 0)
    assert decode_envelope(raw).failed == 0
    once = mark_redelivered(raw, failed=True)
    twice = mark_redelivered(once, failed=True)
    assert decode_envelope(twice).failed == 2
    assert decode_envelope(mark_redelivered(twice)).failed == 2  # a plain give-back
    decoded = decode_envelope(twice)
    assert decoded.redelivered and "x-taskframe-failed-deliveries" not in decoded.properties
    # kombu reads the envelope as before: the property is just carried along.
    assert json.loads(twice)["properties"]["delivery_tag"] == json.loads(raw)["properties"][
        "delivery_tag"]
    assert decode_envelope(mark_dead(twice)).failed == 0
    # A copy published again (a deferred ETA) starts over.
    again = encode_envelope(Envelope(decoded.body, properties={
        "x-taskframe-failed-deliveries": 2}), "", "q", 0)
    assert decode_envelope(again).failed == 0
    bad = json.loads(raw)
    bad["properties"]["x-taskframe-failed-deliveries"] = "lots"
    assert decode_envelope(json.dumps(bad)).failed == 0
