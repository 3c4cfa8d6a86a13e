"""An early ack whose confirmation is lost with the link (issue 14, Why 6), on the memory broker.

The worker writes the acks of early-ack tasks before their bodies start and reads the
broker's confirmation later (``Transport.ack_early``, ``unconfirmed_acks``). If the link
drops before the broker confirmed, nobody can tell whether it got the acks: if it did, the
message is gone and the task must run (here, once); if it did not, the broker gives the
message back, and the copy must not run a second time. The memory transport gives held
messages back on a reconnect, as RabbitMQ does; here its ``ack_early`` loses the first
batch's confirmation, after the broker got the acks or before: the link drops as the acks
are written (nothing started yet), or later, once the task ran (AMQP's
``unconfirmed_acks``).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator, Sequence

import pytest
from workers import InlineWorkers, wait_until

from taskframe import Taskframe
from taskframe.transport.base import Message, MessageState
from taskframe.transport.errors import ConnectionLost
from taskframe.transport.memory import MemoryTransport


@pytest.fixture
def app() -> Iterator[Taskframe]:
    app = Taskframe("unsure", broker=f"memory://{uuid.uuid4().hex}", set_as_current=False)
    app.conf.task_acks_late = False
    yield app
    app.close()


def lose_the_first_confirmation(monkeypatch: pytest.MonkeyPatch, *, broker_got_it: bool) -> None:
    real = MemoryTransport.ack_early
    lost: list[bool] = []

    def ack_early(self: MemoryTransport, messages: Sequence[Message]) -> None:
        if lost:
            return real(self, messages)
        lost.append(True)
        if broker_got_it:
            real(self, messages)
        else:  # written, never processed: the broker still holds them
            for message in messages:
                message.state = MessageState.ACKED
        raise ConnectionLost("the link dropped before the broker confirmed the acks")

    monkeypatch.setattr(MemoryTransport, "ack_early", ack_early)


@pytest.mark.parametrize("broker_got_it", [True, False], ids=["acked", "not-acked"])
def test_a_task_whose_ack_confirmation_was_lost_runs_once(
        app: Taskframe, monkeypatch: pytest.MonkeyPatch, broker_got_it: bool) -> None:
    runs: list[str] = []
    lock = threading.Lock()

    @app.task(name="unsure.count", bind=True)
    def count(self: object) -> None:
        with lock:
            runs.append(str(count.request.id))

    lose_the_first_confirmation(monkeypatch, broker_got_it=broker_got_it)
    task_id = count.apply_async(ignore_result=True).id
    workers = InlineWorkers(app, concurrency=1)
    try:
        workers.start()
        wait_until(lambda: runs, 10, "the task to run")
        time.sleep(0.5)  # a second run, from the copy given back, would come now
    finally:
        workers.stop_all()
    assert runs == [task_id]


def drop_the_link_before_the_first_confirmation(monkeypatch: pytest.MonkeyPatch, *,
                                                broker_got_it: bool) -> threading.Event:
    """The first batch's acks are written (processed by the broker or not) and its task
    starts; the link drops once it ran, before the confirmation was read."""
    real_ack, real_poll = MemoryTransport.ack_early, MemoryTransport.poll
    unconfirmed: list[Message] = []
    ran = threading.Event()

    def ack_early(self: MemoryTransport, messages: Sequence[Message]) -> None:
        if unconfirmed or not messages:
            return real_ack(self, messages)
        unconfirmed.extend(messages)
        owner.append(self)
        if broker_got_it:
            return real_ack(self, messages)
        for message in messages:  # written, never processed: the broker still holds them
            message.state = MessageState.ACKED
        return None

    def poll(self: MemoryTransport, timeout: float | None = None) -> list[Message]:
        if owner and self is owner[0] and ran.is_set() and not dropped:  # the worker's link
            dropped.append(True)
            raise ConnectionLost("the link dropped before the broker confirmed the acks")
        return real_poll(self, timeout)

    dropped: list[bool] = []
    owner: list[MemoryTransport] = []
    monkeypatch.setattr(MemoryTransport, "ack_early", ack_early)
    monkeypatch.setattr(MemoryTransport, "poll", poll)
    monkeypatch.setattr(MemoryTransport, "unconfirmed_acks",
                        lambda self: list(unconfirmed) if self in owner else [])
    return ran


@pytest.mark.parametrize("broker_got_it", [True, False], ids=["acked", "not-acked"])
def test_a_task_that_ran_before_its_ack_was_confirmed_runs_once(
        app: Taskframe, monkeypatch: pytest.MonkeyPatch, broker_got_it: bool) -> None:
    runs: list[str] = []
    lock = threading.Lock()
    ran = drop_the_link_before_the_first_confirmation(monkeypatch, broker_got_it=broker_got_it)

    @app.task(name="unsure.count_then_drop", bind=True)
    def count(self: object) -> None:
        with lock:
            runs.append(str(count.request.id))
        ran.set()

    task_id = count.apply_async(ignore_result=True).id
    workers = InlineWorkers(app, concurrency=1)
    try:
        workers.start()
        wait_until(lambda: runs, 10, "the task to run")
        time.sleep(1.0)  # the drop, the reconnect and a copy given back come now
    finally:
        workers.stop_all()
    assert runs == [task_id]
