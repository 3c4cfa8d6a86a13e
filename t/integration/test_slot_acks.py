"""Early acks written by pool slots while the loop uses the same link (issue 14).

A job acked early waits in the pool, unacked, until a slot takes it; the slot writes the
ack right before the body (``Consumer._ack_in_slot``, ``Transport.acks_from_any_thread``).
So one thread writes acks while another polls, acks late messages and keeps the link:
on RabbitMQ two threads' frames must not interleave and no delivery tag may be acked
twice (a ``multiple`` ack planned over a tag a slot is acking closes the channel); on
Redis the book of held claims must not change under a claim or a refresh.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import redis
from services import drop_broker_names, rabbitmq_url, redis_delete_prefix, redis_url
from workers import InlineWorkers, wait_until

from taskframe import Taskframe
from taskframe.pools.threads import ThreadPool
from taskframe.transport import Envelope, Message, Queue, Transport
from taskframe.transport.connection import transport_class
from taskframe.transport.redis_claims import Claims
from taskframe.worker.consumer import Consumer

PATIENCE = 60.0  # a guard against hanging, never a timing assertion
BROKERS = ["amqp", "redis"]


def url_of(kind: str) -> str:
    return rabbitmq_url() if kind == "amqp" else redis_url()


@pytest.fixture
def names() -> Iterator[dict[str, str]]:
    made = {"queue": f"slotacks-{uuid.uuid4().hex[:10]}",
            "prefix": f"slotacks-{uuid.uuid4().hex[:8]}."}
    yield made
    redis_delete_prefix(0, made["prefix"])


def make(kind: str, prefix: str) -> Transport:
    url = url_of(kind)
    options = {"global_keyprefix": prefix} if kind == "redis" else {}
    transport = transport_class(url)(url, options)
    transport.connect()
    return transport


def held_by_broker(kind: str, prefix: str, queue: str) -> int:
    """Messages still in the queue or held (unacked) once every transport closed."""
    if kind == "redis":
        client = redis.Redis.from_url(redis_url())
        try:
            return int(client.hlen(f"{prefix}unacked")) + int(client.llen(f"{prefix}{queue}"))
        finally:
            client.close()
    admin = make(kind, prefix)
    try:
        return admin.queue_size(queue)
    finally:
        admin.close()


def widen_the_redis_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make a slot's early ack pause between its steps (as a thread switch can), so the
    loop's claims and refreshes meet it half done unless the book is locked."""
    real = Claims.ack_later
    loop = threading.current_thread()

    def ack_later(self: Claims, messages: Sequence[Message]) -> None:
        real(self, messages)
        if threading.current_thread() is not loop:
            time.sleep(0.0005)

    monkeypatch.setattr(Claims, "ack_later", ack_later)


@pytest.mark.parametrize("kind", BROKERS)
def test_a_thread_acks_early_while_the_loop_polls_and_acks_late(
        kind: str, names: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    queue, prefix = Queue(names["queue"]), names["prefix"]
    if kind == "redis":
        widen_the_redis_windows(monkeypatch)
    total = 3000
    t = make(kind, prefix)
    try:
        assert t.acks_from_any_thread
        t.declare(queue)
        for n in range(total):
            t.publish(Envelope(body=b"{}", headers={"n": n}), exchange="",
                      routing_key=queue.name)
        t.consume([queue], prefetch_count=64)
        early: list[Message] = []
        cond = threading.Condition()
        errors: list[BaseException] = []
        done = threading.Event()

        def slot() -> None:  # acks every even message, one at a time, as slots do
            try:
                while not done.is_set():
                    with cond:
                        cond.wait_for(lambda: early or done.is_set(), timeout=1.0)
                        batch = early[:1]
                        del early[:1]
                    if batch:
                        t.ack_early(batch)
            except BaseException as exc:  # reported by the test below
                errors.append(exc)

        thread = threading.Thread(target=slot)
        thread.start()
        settled = 0
        deadline = time.monotonic() + PATIENCE
        try:
            while settled < total and not errors:
                assert time.monotonic() < deadline, f"only {settled} of {total} settled"
                got = t.poll(0.2)
                late = [m for m in got if int(m.headers["n"]) % 2]
                with cond:
                    early.extend(m for m in got if not int(m.headers["n"]) % 2)
                    cond.notify()
                for message in late[:2]:  # one by one: acked, or dropped
                    if int(message.headers["n"]) % 4 == 1:
                        message.ack()
                    else:
                        message.reject(requeue=False)
                if late[2:]:
                    t.ack_many(late[2:])  # RabbitMQ: one ``multiple`` ack where it can
                settled += len(got)
                t.maintain()
            wait_until(lambda: not early or bool(errors), PATIENCE, "the slot's acks")
        finally:
            done.set()
            with cond:
                cond.notify()
            thread.join(PATIENCE)
        assert errors == []
        assert settled == total
        wait_until(lambda: not t.poll(0.1) and not t.unconfirmed_acks(), PATIENCE,
                   "the acks to be confirmed")
    finally:
        t.close()
    try:
        assert held_by_broker(kind, prefix, queue.name) == 0  # none given back at close
    finally:
        drop_broker_names(url_of(kind), queues=[queue.name], exchanges=[queue.name])


@pytest.mark.parametrize("kind", BROKERS)
@pytest.mark.parametrize(("pool", "concurrency"), [("threads", 8), ("solo", 1)])
def test_a_worker_runs_every_task_once_with_early_acks_written_by_its_slots(
        kind: str, pool: str, concurrency: int, names: dict[str, str],
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    queue, prefix = names["queue"], names["prefix"]
    app = Taskframe("slotacks", broker=url_of(kind), set_as_current=False)
    app.conf.broker_transport_options = {"global_keyprefix": prefix} if kind == "redis" else {}
    app.conf.task_default_queue = queue
    app.conf.task_acks_late = False
    in_slot: list[bool] = []
    real = Consumer._ack_in_slot

    def spy(self: Consumer, job: Any) -> bool:
        written = real(self, job)
        in_slot.append(written)
        return written

    monkeypatch.setattr(Consumer, "_ack_in_slot", spy)
    # Eight threads writing acks while the loop reads and writes: as prefork's dispatch
    # thread and solo's slot do, at a pace they cannot reach.
    monkeypatch.setattr(ThreadPool, "acks_in_slot", True)
    ran: dict[str, int] = {}
    lock = threading.Lock()

    @app.task(name="slotacks.early")
    def early(n: int) -> int:
        return n

    @app.task(name="slotacks.late", acks_late=True)
    def late(n: int) -> int:
        return n

    from taskframe.signals import task_postrun

    def count(task_id: str | None = None, **_: Any) -> None:
        with lock:
            ran[str(task_id)] = ran.get(str(task_id), 0) + 1

    task_postrun.connect(count)
    sent = [(late if n % 3 == 0 else early).apply_async((n,), ignore_result=True).id
            for n in range(600)]
    workers = InlineWorkers(app, pool=pool, concurrency=concurrency, prefetch_multiplier=8)
    caplog.set_level(logging.WARNING, logger="taskframe")
    try:
        workers.start()
        wait_until(lambda: len(ran) == len(sent), PATIENCE, "every task to run")
        time.sleep(0.5)  # a second run would come now
    finally:
        workers.stop_all(timeout=30)
        task_postrun.disconnect(count)
        app.close()
    try:
        assert held_by_broker(kind, prefix, queue) == 0
    finally:
        drop_broker_names(url_of(kind), queues=[queue], exchanges=[queue])
    assert sorted(ran) == sorted(sent)
    assert [task_id for task_id, runs in ran.items() if runs != 1] == []
    assert in_slot and all(in_slot)  # early acks went through the slots, none failed
    assert not [r.getMessage() for r in caplog.records if "Connection to broker lost" in
                r.getMessage()]
