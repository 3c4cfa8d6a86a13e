"""Routing: task_queues, task_routes (exact, glob, callable), per-call options."""

from __future__ import annotations

from taskframe.client.router import Router
from taskframe.config import Settings
from taskframe.transport import Exchange, Queue


def _router(**settings: object) -> Router:
    conf = Settings()
    conf.update(settings)
    return Router(conf)


def test_default_queue_goes_through_the_default_exchange() -> None:
    route = _router().route("proj.add", [], {}, {})
    assert route.queue.name == "celery"
    assert (route.exchange, route.routing_key) == ("", "celery")


def test_routes_exact_glob_and_callable() -> None:
    router = _router(task_routes=[
        {"proj.add": {"queue": "math"}, "proj.io.*": "io"},
        lambda name, args, kwargs, options: {"queue": "dyn"} if name == "other" else None,
    ])
    assert router.route("proj.add", [], {}, {}).queue.name == "math"
    assert router.route("proj.io.fetch", [], {}, {}).queue.name == "io"
    assert router.route("other", [], {}, {}).queue.name == "dyn"
    assert router.route("unrouted", [], {}, {}).queue.name == "celery"


def test_call_option_beats_route_beats_task_attribute() -> None:
    router = _router(task_routes={"t": {"queue": "routed"}})
    assert router.route("t", [], {}, {"queue": "explicit"}).queue.name == "explicit"
    assert router.route("t", [], {}, {}, task_queue="attr").queue.name == "routed"
    assert router.route("u", [], {}, {}, task_queue="attr").queue.name == "attr"


def test_topic_queue_publishes_to_its_exchange() -> None:
    q = Queue("events", Exchange("ev", "topic"), "events.#")
    route = _router(task_queues=[q]).route("t", [], {}, {"queue": "events"})
    assert (route.exchange, route.routing_key) == ("ev", "events.#")


def test_quorum_default_queue_type_applies_to_missing_queues() -> None:
    router = _router(task_default_queue_type="quorum")
    assert router.queue("new").queue_type == "quorum"
