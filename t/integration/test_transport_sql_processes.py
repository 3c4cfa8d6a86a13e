"""Exactly-once at the transport level: two consumer processes share one SQL queue.

Each of 2,000 messages must be consumed (and acked) exactly once, and none left.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import services
import sqlalchemy as sa

from taskframe.transport import Envelope
from taskframe.transport.connection import transport_class
from taskframe.transport.sql_schema import sqlalchemy_url

CHILD = Path(__file__).with_name("sql_consumer_child.py")
MESSAGES = 2000
PROCESSES = 2


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("mariadb", marks=pytest.mark.mysql),
    ]
)
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'shared.sqlite3'}", {}
        return
    server = services.postgres_url() if request.param == "postgres" else services.mysql_url()
    prefix = f"tfp_{uuid.uuid4().hex[:10]}_"
    url = "sqla+" + server
    yield url, {"table_prefix": prefix}
    engine = sa.create_engine(sqlalchemy_url(url))
    with engine.begin() as conn:
        for table in ("messages", "bindings"):
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {prefix}{table}"))
    engine.dispose()


@pytest.mark.slow
def test_two_processes_consume_each_message_once(
    broker: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    url, options = broker
    queue = f"once-{uuid.uuid4().hex[:8]}"
    producer = transport_class(url)(url, options)
    producer.connect()  # creates the tables before the children race for them
    names = [f"child{i}" for i in range(PROCESSES)]
    children = [
        subprocess.Popen(
            [sys.executable, str(CHILD), url, json.dumps(options), queue, str(tmp_path), name]
        )
        for name in names
    ]
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"{n}.ready").exists() for n in names):
            assert all(c.poll() is None for c in children), "a consumer process died"
            assert time.monotonic() < deadline, "consumer processes did not start"
            time.sleep(0.05)
        for n in range(MESSAGES):
            body = json.dumps({"id": n}).encode()
            producer.publish(Envelope(body), exchange="", routing_key=queue)
        (tmp_path / "published").touch()
        codes = [child.wait(timeout=280) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert codes == [0] * PROCESSES

    per_child = [json.loads((tmp_path / f"{n}.json").read_text()) for n in names]
    counts = collections.Counter(i for ids in per_child for i in ids)
    assert sorted(counts) == list(range(MESSAGES))
    assert [i for i, seen in counts.items() if seen != 1] == []
    assert all(ids for ids in per_child), "one process consumed nothing: no contention tested"
    assert producer.queue_size(queue) == 0
    producer.close()
    engine = sa.create_engine(sqlalchemy_url(url))
    prefix = options.get("table_prefix", "taskframe_")
    with engine.connect() as conn:
        left = conn.execute(sa.text(f"SELECT COUNT(*) FROM {prefix}messages")).scalar()
    engine.dispose()
    assert left == 0
