"""An early ack whose confirmation is lost with the link (issue 14, Why 6), on the memory broker.

The worker acks an early-ack task and waits for the broker to confirm before the body
starts. If the link drops in that round trip, nobody can tell whether the broker got the
ack: if it did, the message is gone and the task must run here, now; if it did not, the
broker gives the message back, and the copy must not run a second time. The memory
transport gives held messages back on a reconnect, as RabbitMQ does; its ``ack_now`` is
made to lose the confirmation of the first batch, after the broker got the acks or before.
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
    real = MemoryTransport.ack_now
    lost: list[bool] = []

    def ack_now(self: MemoryTransport, messages: Sequence[Message]) -> None:
        if lost:
            return real(self, messages)
        lost.append(True)
        if broker_got_it:
            real(self, messages)
        else:  # written, never processed: the broker still holds them
            for message in messages:
                message.state = MessageState.ACKED
        raise ConnectionLost("the link dropped before the broker confirmed the acks")

    monkeypatch.setattr(MemoryTransport, "ack_now", ack_now)


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
