"""Canvas primitives, nested shapes and chord errors on worker processes.

Every combination of broker (RabbitMQ, Redis) and result backend (Redis, PostgreSQL through
the database backend) runs the same canvases against real ``taskframe worker`` processes of
``t/integration/canvasproj/cvproj.py``, and a chord of 1,000 header tasks whose body must run
exactly once (on Redis + Redis two workers share it).
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import services
from workers import ProjectImport, WorkerProcs, wait_until

from taskframe.canvas import chain, chord, group
from taskframe.errors import ChordError

pytestmark = [pytest.mark.slow]

PROJ_DIR = Path(__file__).parent / "canvasproj"
T = 30.0
COMBOS = [("amqp", "redis"), ("amqp", "database"), ("redis", "redis"), ("redis", "database")]


@dataclass
class Fleet:
    """The project imported here, its workers, and what to clean up."""

    broker: str
    backend: str
    prefix: str
    proj: Any
    workers: WorkerProcs
    redis: redis.Redis

    def errors(self) -> list[str]:
        return [e.decode() for e in self.redis.lrange(f"{self.prefix}errors", 0, -1)]


def _urls(broker: str, backend: str) -> tuple[str, str]:
    broker_url = services.rabbitmq_url() if broker == "amqp" else services.redis_url()
    if backend == "redis":
        return broker_url, services.redis_url()
    return broker_url, services.postgres_url().replace("postgresql://", "db+postgresql://", 1)


def _drop(prefix: str, queue: str, broker: str) -> None:
    services.redis_delete_prefix(0, prefix)
    import sqlalchemy as sa

    engine = sa.create_engine(services.postgres_url().replace("postgresql://",
                                                              "postgresql+psycopg://", 1))
    with engine.begin() as conn:
        for name in ("taskmeta", "tasksetmeta", "counters"):
            conn.execute(sa.text(f'DROP TABLE IF EXISTS "{prefix.replace(".", "_")}{name}"'))
    engine.dispose()
    if broker == "amqp":
        import amqp

        with amqp.Connection("127.0.0.1:5672") as conn:
            channel = conn.channel()
            channel.queue_delete(queue)


def _counter_rows(prefix: str, group_id: str) -> int:
    import sqlalchemy as sa

    engine = sa.create_engine(services.postgres_url().replace("postgresql://",
                                                              "postgresql+psycopg://", 1))
    table = f'"{prefix.replace(".", "_")}counters"'
    with engine.begin() as conn:
        found = conn.execute(sa.text(f"SELECT count(*) FROM {table} WHERE key LIKE :k"),
                             {"k": f"chord-unlock-{group_id}%"}).scalar_one()
    engine.dispose()
    return int(found)


@pytest.fixture(scope="module", params=COMBOS, ids=[f"{b}-{r}" for b, r in COMBOS])
def fleet(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    broker, backend = request.param
    broker_url, backend_url = _urls(broker, backend)
    prefix = f"tfcv{uuid.uuid4().hex[:8]}."
    queue = f"{prefix}q"
    env = {"CV_BROKER": broker_url, "CV_BACKEND": backend_url, "CV_PREFIX": prefix,
           "CV_QUEUE": queue, "CV_REDIS": services.redis_url()}
    proj = ProjectImport(PROJ_DIR, "cvproj", env)
    procs = WorkerProcs(PROJ_DIR, "cvproj", env, tmp_path_factory.mktemp("cv"),
                        command=[sys.executable, "-m", "taskframe", "-A", "cvproj", "worker"])
    count = 2 if (broker, backend) == ("redis", "redis") else 1
    for _ in range(count):
        procs.start("-P", "threads", "-c", "4")
    client = redis.Redis.from_url(services.redis_url())
    fleet = Fleet(broker, backend, prefix, proj.module, procs, client)
    try:
        assert fleet.proj.add.delay(1, 1).get(timeout=60) == 2, procs.log_text()
        yield fleet
    finally:
        procs.stop()
        proj.close()
        client.close()
        _drop(prefix, queue, broker)


def test_every_primitive(fleet: Fleet) -> None:
    p = fleet.proj
    assert (p.add.s(1, 2) | p.add.s(3) | p.mul.si(2, 5) | p.mul.s(3)).delay().get(timeout=T) \
        == 30
    assert group(p.add.s(i, i) for i in range(10)).delay().get(timeout=T) == \
        [2 * i for i in range(10)]
    assert chord([p.add.s(i, i) for i in range(10)])(p.ident.s()).get(timeout=T) == \
        [2 * i for i in range(10)]
    assert p.ident.map([1, 2]).delay().get(timeout=T) == [1, 2]
    assert p.add.starmap([(1, 2), (3, 4)]).delay().get(timeout=T) == [3, 7]
    assert p.add.chunks([(i, 1) for i in range(5)], 2).delay().get(timeout=T) == \
        [[1, 2], [3, 4], [5]]
    assert p.replacer.delay(1).get(timeout=T) == 202


NESTED: list[tuple[str, Any, Any]] = [
    ("chain of groups", lambda p: chain(group(p.add.s(1, 1), p.add.s(2, 2)),
                                        group(p.tsum.s(), p.tsum.s())), [6, 6]),
    ("chord in a chain", lambda p: chain(p.add.s(1, 1), chord([p.add.s(i) for i in range(3)],
                                                              p.tsum.s()), p.mul.s(10)), 90),
    ("group of chains", lambda p: group(p.add.s(1, 1) | p.mul.s(3),
                                        p.add.s(2, 2) | p.mul.s(3)), [6, 12]),
    ("chord of chords", lambda p: chord([chord([p.add.s(1, 1), p.add.s(2, 2)], p.tsum.s()),
                                         chord([p.add.s(3, 3)], p.tsum.s())], p.ident.s()),
     [6, 6]),
    ("chord with a chain body", lambda p: chord([p.add.s(1, 1), p.add.s(2, 2)],
                                                p.tsum.s() | p.mul.s(2)), 12),
    ("groups nested in a chord header",
     lambda p: chord([group(p.add.s(1, 1), p.add.s(2, 2)), p.add.s(3, 3) | group(
         p.add.s(1), p.add.s(2))], p.ident.s()), [2, 4, [7, 8]]),
]


def test_nested_shapes(fleet: Fleet) -> None:
    for name, build, expected in NESTED:
        result = build(fleet.proj).apply_async()
        got = result.get(timeout=T)
        assert got == expected, f"{name}: {got!r}\n{fleet.workers.log_text()[-3000:]}"


def test_failed_header_fails_the_body_and_calls_its_errback(fleet: Fleet) -> None:
    p = fleet.proj
    body = p.tsum.s().on_error(p.note_error.s())
    result = chord([p.add.s(1, 1), p.boom.s(), p.add.s(2, 2)], body).delay()
    with pytest.raises(ChordError, match="boom"):
        result.get(timeout=T)
    wait_until(lambda: f"{result.id} ChordError" in fleet.errors(), T, "the body's errback")


def test_expired_header_task_fails_the_body(fleet: Fleet) -> None:
    p = fleet.proj
    result = chord([p.add.s(1, 1), p.add.s(2, 2).set(expires=-1)], p.tsum.s()).delay()
    with pytest.raises(ChordError, match="TaskRevokedError"):
        result.get(timeout=T)


def test_failed_link_stops_the_chain(fleet: Fleet) -> None:
    p = fleet.proj
    c = p.add.s(1, 1) | p.boom.s() | p.add.s(1)
    c.link_error(p.note_error.s())
    result = c.delay()
    with pytest.raises(ValueError, match="boom"):
        result.get(timeout=T)
    wait_until(lambda: any(e.endswith("ValueError") for e in fleet.errors()), T,
               "the chain's errback")


def test_thousand_header_chord_fires_its_body_once(fleet: Fleet) -> None:
    p = fleet.proj
    result = chord([p.add.s(i, 0) for i in range(1000)], p.count_body.s()).delay()
    assert result.get(timeout=120) == [1, 1000, sum(range(1000))], \
        fleet.workers.log_text()[-3000:]
    # A second look after the workers went idle: still exactly one run of the body.
    assert fleet.proj.add.delay(0, 0).get(timeout=T) == 0
    assert int(fleet.redis.get(f"{fleet.prefix}body-runs") or 0) == 1
    if fleet.backend == "redis":  # Celery's chord keys, cleaned up, with the done marker
        claim = f"{fleet.prefix}celery-taskset-meta-{result.parent.id}"
        assert fleet.redis.get(claim + ".c") == b"done"
        assert not fleet.redis.exists(claim + ".j", claim + ".s", claim + ".d")
    else:  # the counter and the fire claim rows are deleted, and the saved header
        wait_until(lambda: _counter_rows(fleet.prefix, result.parent.id) == 0, T,
                   "the chord's counter rows deleted")
        assert p.app.backend.restore_group(result.parent.id) is None


def test_redelivered_header_tasks_do_not_fire_the_body_twice(fleet: Fleet) -> None:
    p = fleet.proj
    size = 20
    ids = [str(uuid.uuid4()) for _ in range(size)]
    header = group(p.add.s(i, 0).set(task_id=ids[i]) for i in range(size))
    header.set(task_id=str(uuid.uuid4()))
    body = p.count_body.s(key="redelivered").set(task_id=str(uuid.uuid4()))
    embedded = {**dict(body), "chord_size": size}
    # What a broker redelivery looks like: the same header messages, run once before.
    for i in range(3):
        p.add.apply_async((i, 0), task_id=ids[i], group_id=header.id, group_index=i,
                          chord=embedded)
    for i in range(3):
        assert p.app.AsyncResult(ids[i]).get(timeout=T) == i
    result = chord(header, body).delay()
    assert result.get(timeout=T) == [1, size, sum(range(size))], \
        fleet.workers.log_text()[-3000:]
    assert result.parent.get(timeout=T) == list(range(size))
    assert p.add.delay(0, 0).get(timeout=T) == 0
    assert int(fleet.redis.get(f"{fleet.prefix}redelivered") or 0) == 1
