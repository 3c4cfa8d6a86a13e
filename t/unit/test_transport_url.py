"""Broker URL parsing, failover lists and password masking."""

from __future__ import annotations

import pytest

from taskframe.transport.errors import ImproperlyConfigured
from taskframe.transport.url import parse_url, safe_url, split_failover


def test_amqp_url_parts() -> None:
    url = parse_url("amqp://guest:s%40cret@rabbit.local:5672//?heartbeat=30")
    assert (url.scheme, url.transport) == ("amqp", "amqp")
    assert (url.host, url.port, url.user, url.password) == ("rabbit.local", 5672, "guest", "s@cret")
    assert url.virtual_host == "/"
    assert url.query == {"heartbeat": "30"}


def test_wrapping_scheme() -> None:
    url = parse_url("sqla+postgresql://postgres@127.0.0.1:5432/test")
    assert (url.scheme, url.transport) == ("sqla+postgresql", "sqla")
    assert url.inner_url == "postgresql://postgres@127.0.0.1:5432/test"
    assert url.virtual_host == "test"
    assert parse_url("redis+sentinel://h:26379/0").transport == "redis"


def test_paths_and_defaults() -> None:
    sqlite = parse_url("sqlite:////var/lib/tf/broker.sqlite3")
    assert sqlite.host is None
    assert sqlite.path == "//var/lib/tf/broker.sqlite3"
    assert sqlite.inner_url == "sqlite:////var/lib/tf/broker.sqlite3"
    memory = parse_url("memory://")
    assert (memory.host, memory.port, memory.virtual_host) == (None, None, "")
    assert parse_url("redis://localhost/3").virtual_host == "3"


def test_password_never_in_repr_or_str() -> None:
    url = parse_url("redis://:hunter2@localhost:6379/0?password=hunter3&db=1")
    for text in (repr(url), str(url), url.safe_url()):
        assert "hunter2" not in text
        assert "hunter3" not in text
    assert url.safe_url() == "redis://:**@localhost:6379/0?password=**&db=1"
    assert url.password == "hunter2"


@pytest.mark.parametrize(
    ("raw", "masked"),
    [
        ("amqp://u:p@h:1/v", "amqp://u:**@h:1/v"),
        ("amqp://u@h/v", "amqp://u@h/v"),
        ("sqlite:///x.sqlite3", "sqlite:///x.sqlite3"),
        ("memory://", "memory://"),
        ("sqla+postgresql://a:b:c@h/db#frag", "sqla+postgresql://a:**@h/db#frag"),
        ("not a url", "not a url"),
    ],
)
def test_safe_url(raw: str, masked: str) -> None:
    assert safe_url(raw) == masked


def test_split_failover() -> None:
    assert split_failover("amqp://a// ; amqp://b//;") == ["amqp://a//", "amqp://b//"]
    assert split_failover(["amqp://a//;amqp://c//", "amqp://b//"]) == [
        "amqp://a//",
        "amqp://c//",
        "amqp://b//",
    ]
    with pytest.raises(ImproperlyConfigured):
        split_failover(" ; ")


@pytest.mark.parametrize("raw", ["localhost:5672", "amqp://h:notaport/"])
def test_bad_urls(raw: str) -> None:
    with pytest.raises(ImproperlyConfigured):
        parse_url(raw)
