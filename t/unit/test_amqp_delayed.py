"""Native delayed delivery: routing keys, level queues and bindings, checked by routing.

The ladder is simulated with the transport's own topic matcher: every countdown
must add up to exactly the delay asked for, through the bindings we declare.
"""

from __future__ import annotations

import pytest

from taskframe.transport.amqp_delayed import (
    DELIVERY_EXCHANGE,
    FIRST_EXCHANGE,
    LEVELS,
    MAX_DELAY,
    delayed_routing_key,
    destination_bindings,
    direct_binding,
    has_delay_prefix,
    is_delay_exchange,
    level_bindings,
    level_name,
    level_queue_arguments,
    strip_delay_prefix,
    undelayed_routing_key,
)
from taskframe.transport.entities import Exchange, Queue
from taskframe.transport.routing import topic_matches


def test_routing_key_is_28_binary_digits_then_the_key() -> None:
    assert delayed_routing_key(5, "celery") == "0." * 25 + "1.0.1.celery"
    assert delayed_routing_key(MAX_DELAY, "a.b") == "1." * 28 + "a.b"
    assert FIRST_EXCHANGE == "celery_delayed_27" == level_name(27)


@pytest.mark.parametrize("delay", [0, -1, MAX_DELAY + 1])
def test_out_of_range_delays_are_refused(delay: int) -> None:
    with pytest.raises(ValueError, match=r"1\.\.268435455"):
        delayed_routing_key(delay, "q")


def test_a_delay_prefix_is_replaced_not_stacked() -> None:
    once = delayed_routing_key(60, "tasks.q")
    twice = delayed_routing_key(7, once)
    assert twice == delayed_routing_key(7, "tasks.q")
    assert strip_delay_prefix(twice) == "tasks.q"
    assert has_delay_prefix(twice) and not has_delay_prefix("tasks.q")
    assert undelayed_routing_key(twice) == "0." * 28 + "tasks.q"
    for _ in range(100):  # retries never grow the key
        twice = delayed_routing_key(3600, twice)
    assert len(twice) == len(delayed_routing_key(3600, "tasks.q"))


def test_level_queue_arguments_match_celery() -> None:
    assert level_queue_arguments(0) == {
        "x-queue-type": "quorum",
        "x-overflow": "reject-publish",
        "x-message-ttl": 1000,
        "x-dead-letter-exchange": DELIVERY_EXCHANGE,
        "x-dead-letter-strategy": "at-least-once",
    }
    top = level_queue_arguments(27)
    assert top["x-message-ttl"] == 2**27 * 1000
    assert top["x-dead-letter-exchange"] == "celery_delayed_26"
    assert "x-dead-letter-strategy" not in level_queue_arguments(3, "classic")


def _ladder_wait(routing_key: str) -> tuple[int, str]:
    """Walk the ladder as RabbitMQ would: (seconds waited, exchange that delivers it)."""
    waited = 0
    for level in range(LEVELS - 1, -1, -1):
        park, skip = level_bindings(level)
        parks, skips = topic_matches(park, routing_key), topic_matches(skip, routing_key)
        assert parks != skips, f"level {level} must either park or skip {routing_key!r}"
        if parks:
            waited += 2**level
    delivery = "*." * 27 + "0.#"
    assert topic_matches(delivery, "0." * 28 + "q") and not topic_matches(delivery, "1." * 28)
    return waited, DELIVERY_EXCHANGE


@pytest.mark.parametrize("delay", [1, 2, 3, 5, 60, 3600, 86_400 + 17, MAX_DELAY])
def test_the_ladder_waits_exactly_the_delay(delay: int) -> None:
    waited, _ = _ladder_wait(delayed_routing_key(delay, "some.queue"))
    assert waited == delay


def test_direct_queues_bind_straight_to_the_delivery_exchange_exactly() -> None:
    q = Queue("q")
    ((kind, dest, source, key),) = destination_bindings(q)
    assert (kind, dest, source) == ("queue", "q", DELIVERY_EXCHANGE)
    assert topic_matches(key, delayed_routing_key(5, "q"))
    assert not topic_matches(key, delayed_routing_key(5, "x.q")), "q must not get x.q's"
    assert direct_binding("q") == ("queue", "q", DELIVERY_EXCHANGE, key)
    bound = Queue("q2", Exchange("jobs", "direct"), "high")
    assert {b[3].rsplit(".", 1)[-1] for b in destination_bindings(bound)} == {"q2", "high"}


def test_topic_queues_get_celerys_exchange_to_exchange_bindings() -> None:
    q = Queue("work", Exchange("tasks", "topic"), "work.*")
    assert destination_bindings(q) == [
        ("exchange", "tasks", DELIVERY_EXCHANGE, "#.work.*"),
        ("queue", "work", "tasks", "#.work.*"),
    ]
    assert topic_matches("#.work.*", delayed_routing_key(9, "work.high"))
    already = Queue("all", Exchange("tasks", "topic"), "#")
    assert destination_bindings(already)[0][3] == "#"


def test_delay_exchange_names() -> None:
    assert is_delay_exchange(DELIVERY_EXCHANGE) and is_delay_exchange("celery_delayed_0")
    assert not is_delay_exchange("celery") and not is_delay_exchange("")
