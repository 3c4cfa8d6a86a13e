"""AMQP topic matching and exchange routing used by the memory and SQL transports."""

from __future__ import annotations

import pytest

from taskframe.transport.errors import ImproperlyConfigured
from taskframe.transport.routing import Binding, check_exchange_type, route, topic_matches


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("a.b.c", "a.b.c", True),
        ("a.b.c", "a.b", False),
        ("a.*.c", "a.x.c", True),
        ("a.*.c", "a.c", False),
        ("a.#", "a", True),
        ("a.#", "a.b.c", True),
        ("#", "", True),
        ("#", "anything.at.all", True),
        ("#.c", "a.b.c", True),
        ("#.c", "c", True),
        ("a.#.c", "a.c", True),
        ("a.#.c", "a.b.b.c", True),
        ("a.#.c", "a.b.d", False),
        ("*", "a", True),
        ("*", "a.b", False),
        ("*.#", "", False),
        ("*", "", False),
        ("", "", True),
        ("", "a", False),
        ("a.b", "a.b.c", False),
    ],
)
def test_topic_matches(pattern: str, key: str, matches: bool) -> None:
    assert topic_matches(pattern, key) is matches


def test_route_by_exchange_type() -> None:
    bindings = [
        Binding("ex", "direct", "k", "q1"),
        Binding("ex", "direct", "other", "q2"),
        Binding("ex", "direct", "k", "q1"),  # duplicate binding: one copy
    ]
    assert route(bindings, "k") == ["q1"]
    assert route([Binding("f", "fanout", "", "a"), Binding("f", "fanout", "", "b")], "x") == [
        "a",
        "b",
    ]
    assert route([Binding("t", "topic", "*.x", "q")], "y.x") == ["q"]
    assert route([Binding("t", "topic", "*.x", "q")], "y.z") == []


def test_headers_exchange_refused() -> None:
    check_exchange_type("topic")
    with pytest.raises(ImproperlyConfigured):
        check_exchange_type("headers")
