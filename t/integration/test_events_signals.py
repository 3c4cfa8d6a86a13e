"""``WorkerEvents`` turns taskframe's signals into Celery's task events (on Redis).

The signals are sent here as the worker sends them, so every event type and the
node filter are covered without timing a real task into each state.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import services

from taskframe import Taskframe, signals
from taskframe.context import Context, request_context
from taskframe.errors import Reject, Retry
from taskframe.events import EventReceiver, WorkerEvents

pytestmark = pytest.mark.redis

NODE = "sig@test"


class FakeConsumer:
    """The sender of ``task_received`` / ``task_unknown``: only its ``hostname`` is read."""

    def __init__(self, hostname: str) -> None:
        self.hostname = hostname


@pytest.fixture
def node() -> Iterator[tuple[WorkerEvents, EventReceiver]]:
    url = services.redis_url()
    app = Taskframe("sigproj")
    app.conf.broker_url = url
    app.conf.event_exchange = f"tfevs-{uuid.uuid4().hex[:8]}"
    receiver = EventReceiver.for_app(app)
    receiver.consume()
    events = WorkerEvents(app, NODE, lambda: (1, 2), task_events=False, heartbeat_interval=0)
    yield events, receiver
    events.stop()
    receiver.close()
    services.redis_delete_prefix(0, f"_kombu.binding.{app.conf.event_exchange}")


def _drain(events: WorkerEvents, receiver: EventReceiver, count: int) -> list[dict[str, Any]]:
    assert events.dispatcher is not None
    assert events.dispatcher.flush(10)
    got = list(receiver.itercapture(limit=count, timeout=10))
    return got + list(receiver.itercapture(timeout=0.3))  # nothing more


def _ctx(hostname: str = NODE, **fields: Any) -> Context:
    return Context(id=str(uuid.uuid4()), task="proj.add", args=[2, 3], kwargs={},
                   hostname=hostname, called_directly=False,
                   headers={"argsrepr": "(2, 3)", "kwargsrepr": "{}"}, **fields)


def test_task_events_follow_signals_and_enable_disable(
        node: tuple[WorkerEvents, EventReceiver]) -> None:
    events, receiver = node
    consumer = FakeConsumer(NODE)
    events.start()
    online = _drain(events, receiver, 1)
    assert [e["type"] for e in online] == ["worker-online"]
    assert (online[0]["active"], online[0]["processed"]) == (1, 2)

    signals.task_received.send(sender=consumer, request=_ctx())  # no -E yet: nothing
    assert events.enable_task_events() is True
    assert events.enable_task_events() is False

    ok = _ctx()
    signals.task_received.send(sender=consumer, request=ok)
    signals.task_received.send(sender=FakeConsumer("other@x"), request=_ctx("other@x"))
    with request_context(ok):
        signals.task_prerun.send(sender=None, task_id=ok.id)
        signals.task_success.send(sender=None, result={"sum": 5})
    eager = _ctx(is_eager=True)
    with request_context(eager):
        signals.task_success.send(sender=None, result=1)
    progress = events.app.task(name="proj.progress")(lambda: None)
    with request_context(ok):
        progress.send_event("task-progress", current=3, total=4)  # as Celery's Task.send_event
    progress.send_event("task-progress", current=0)  # not in a task: nothing
    got = _drain(events, receiver, 4)
    assert [(e["type"], e["uuid"]) for e in got] == [
        ("task-received", ok.id), ("task-started", ok.id), ("task-succeeded", ok.id),
        ("task-progress", ok.id)]
    assert (got[3]["current"], got[3]["total"], got[3]["hostname"]) == (3, 4, NODE)
    received = got[0]
    assert (received["name"], received["args"], received["kwargs"]) == \
        ("proj.add", "(2, 3)", "{}")
    assert received["retries"] == 0 and received["eta"] is None
    assert got[2]["result"] == "{'sum': 5}" and got[2]["runtime"] >= 0.0

    retried, revoked, rejected, lost = _ctx(), _ctx(), _ctx(), _ctx()
    signals.task_retry.send(sender=None, request=retried,
                            reason=Retry(exc=KeyError("k")), einfo="Traceback...")
    signals.task_revoked.send(sender=None, request=revoked, terminated=True, signum=15,
                              expired=False)
    signals.task_rejected.send(sender=None, request=rejected, exc=Reject("no", requeue=True))
    signals.task_unknown.send(sender=consumer, name="nope", id="unknown-id")
    signals.task_received.send(sender=consumer, request=lost)
    # A pool child died: the failure is reported outside the task, by id.
    signals.task_failure.send(sender=None, task_id=lost.id, exception=OSError("lost"),
                              traceback=None)
    got = {e["uuid"] + e["type"]: e for e in _drain(events, receiver, 6)}
    assert got[retried.id + "task-retried"]["exception"] == "KeyError('k')"
    assert got[retried.id + "task-retried"]["traceback"] == "Traceback..."
    assert {k: got[revoked.id + "task-revoked"][k] for k in ("terminated", "signum", "expired")} \
        == {"terminated": True, "signum": 15, "expired": False}
    assert got[rejected.id + "task-rejected"]["requeue"] is True
    assert got["unknown-id" + "task-failed"]["exception"] == "NotRegistered('nope')"
    assert got[lost.id + "task-failed"]["exception"] == "OSError('lost')"

    assert events.disable_task_events() is True
    signals.task_received.send(sender=consumer, request=_ctx())
    events.heartbeat()
    beat = _drain(events, receiver, 1)
    assert [e["type"] for e in beat] == ["worker-heartbeat"]
    assert beat[0]["freq"] == 2.0  # no periodic heartbeat: Celery's default is announced

    events.stop()
    receiver_events = list(receiver.itercapture(limit=1, timeout=10))
    assert [e["type"] for e in receiver_events] == ["worker-offline"]
