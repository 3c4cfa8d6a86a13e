"""Chord counters are deleted once the body is sent, on every backend with a counter.

``Backend.delete_counter`` on SQLite, PostgreSQL, MariaDB, Redis and the GCS emulator,
and the last part of a chord on the counter path (``taskframe.canvas.chord_completion``)
leaving neither
its counter, its fire claim nor its saved header behind. (Redis chords use Celery's own
keys instead: t/integration/test_canvas_workers.py checks those are deleted.)
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gcs_emulator
import pytest
import services
import sqlalchemy as sa

from taskframe import Taskframe, signals, states
from taskframe.backends import Backend, BackendOptions, create_backend
from taskframe.backends.chord_counter import counter_key
from taskframe.backends.database import DatabaseBackend
from taskframe.canvas.chord_completion import on_chord_part_return
from taskframe.context import Context
from taskframe.protocol import group_tuple, result_tuple

KINDS = ["sqlite", "postgres", "mysql", "redis", "gcs"]


def _url(kind: str, tmp_path: Path, suffix: str) -> str:
    if kind == "sqlite":
        return f"db+sqlite:///{tmp_path}/results.sqlite3"
    if kind == "postgres":
        return "db+" + services.postgres_url()
    if kind == "mysql":
        return "db+" + services.mysql_url()
    if kind == "redis":
        return f"{services.redis_url(11)}?global_keyprefix=tf-cc-{suffix}:"
    return gcs_emulator.backend_url(f"tf-cc-{suffix}")


@pytest.fixture
def backend(kind: str, tmp_path: Path) -> Iterator[Backend]:
    suffix = uuid.uuid4().hex[:10]
    url = _url(kind, tmp_path, suffix)
    tables = {"task": f"tf_cct_{suffix}", "group": f"tf_ccg_{suffix}",
              "counter": f"tf_ccc_{suffix}"}
    made = create_backend(url, BackendOptions(table_names=tables))
    yield made
    made.close()
    if kind == "redis":
        services.redis_delete_prefix(11, f"tf-cc-{suffix}:")
    elif kind == "gcs":
        gcs_emulator.delete_base_path(f"tf-cc-{suffix}")
    else:
        engine = sa.create_engine(DatabaseBackend(url, BackendOptions(
            table_names=tables, create_tables_at_setup=False))._sa_url)
        with engine.begin() as conn:
            for name in tables.values():
                conn.exec_driver_sql(f"DROP TABLE IF EXISTS {name}")
        engine.dispose()


@pytest.mark.parametrize("kind", KINDS)
def test_delete_counter_starts_it_again(backend: Backend) -> None:
    key = f"chord-unlock-{uuid.uuid4()}"
    assert [backend.incr(key), backend.incr(key)] == [1, 2]
    backend.delete_counter(key)
    assert backend.incr(key) == 1
    backend.delete_counter(key)
    backend.delete_counter(key)  # deleting what is not there is fine
    assert backend.incr(key) == 1


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "redis"])  # Redis: Celery's keys
def test_the_last_part_sends_the_body_then_deletes_the_counters(backend: Backend) -> None:
    app = Taskframe("cc", broker=f"memory://{uuid.uuid4().hex}", backend="memory://",
                    set_as_current=False)
    app._backend = backend
    sent: list[Any] = []

    def record(sender: Any = None, body: Any = None, **_: Any) -> None:
        sent.append((sender, body[0]))

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    @app.task
    def total(values: list[int]) -> int:
        return sum(values)

    group_id = str(uuid.uuid4())
    ids = [str(uuid.uuid4()) for _ in range(3)]
    for value, task_id in enumerate(ids):
        backend.mark_as_done(task_id, value)
    backend.save_group(group_id, group_tuple(group_id, [result_tuple(i) for i in ids]))
    backend.incr(counter_key(group_id))
    backend.incr(counter_key(group_id))  # two parts already counted
    ctx = Context(id=ids[2], group=group_id, group_index=2, called_directly=False,
                  chord={**dict(total.s()), "chord_size": 3})
    signals.before_task_publish.connect(record)
    try:
        on_chord_part_return(add, ctx, states.SUCCESS, 2)
    finally:
        signals.before_task_publish.disconnect(record)
        app.close()
    assert sent == [(total.name, [[0, 1, 2]])]
    assert backend.restore_group(group_id) is None
    # Both counters are gone: counting from scratch gives 1 again.
    assert backend.incr(counter_key(group_id)) == 1
    assert backend.incr(counter_key(group_id) + ".fired") == 1
