"""A delivery on the SQL transport belongs to the worker, not to its database connections.

A real worker process of ``redisproj/rproj.py`` (the project takes any broker URL) on
PostgreSQL, with a visibility timeout of an hour: the server closes the worker's
connections (``pg_terminate_backend`` of the sessions named by the worker's
``application_name``: no other client is touched) while four acks_late tasks run. They
must run once, and their acks must reach the table: before, the reconnect made a new
claim token, the late acks were skipped and the four rows stayed claimed by nobody (an
hour here; then they would have run again).
"""

from __future__ import annotations

import collections
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import services
import sqlalchemy as sa
from workers import ProjectImport, WorkerProcs, read_lines, wait_until

PROJ_DIR = Path(__file__).parent / "redisproj"
sys.path.insert(0, str(PROJ_DIR))


class SqlScene:
    def __init__(self, tmp_path: Path) -> None:
        self.name = f"tfsd{uuid.uuid4().hex[:8]}"
        self.prefix = f"{self.name}_"
        base = services.postgres_url()
        self.engine = sa.create_engine(base.replace("postgresql://", "postgresql+psycopg://"))
        self.record = tmp_path / "record.txt"
        env = {
            "TASKFRAME_BROKER_URL": f"sqla+{base}?application_name={self.name}",
            "RPROJ_RECORD": str(self.record),
            "RPROJ_PREFIX": "",
            "RPROJ_TABLE_PREFIX": self.prefix,
            "RPROJ_VISIBILITY_TIMEOUT": "3600",
        }
        self.workers = WorkerProcs(PROJ_DIR, "rproj", env, tmp_path)
        self.workers.env.pop("TASKFRAME_RESULT_BACKEND", None)
        self.project: ProjectImport | None = ProjectImport(PROJ_DIR, "rproj", env)
        self.module = self.project.module

    def lines(self, kind: str) -> list[list[str]]:
        return [line.split() for line in read_lines(self.record) if line.startswith(kind)]

    def rows(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.text(f"SELECT count(*) FROM {self.prefix}messages"))
                       .scalar_one())

    def cut(self) -> int:
        """Close every server session of the worker (and of the client: same name)."""
        with self.engine.connect() as conn:
            killed = conn.execute(sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = :name"), {"name": self.name}).fetchall()
            conn.commit()
        return len(killed)

    def close(self) -> None:
        self.workers.stop()
        if self.project is not None:
            self.project.close()
            self.project = None
        with self.engine.begin() as conn:
            for table in ("messages", "bindings"):
                conn.execute(sa.text(f"DROP TABLE IF EXISTS {self.prefix}{table}"))
        self.engine.dispose()


@pytest.fixture
def scene(tmp_path: Path) -> Iterator[SqlScene]:
    scene = SqlScene(tmp_path)
    yield scene
    scene.close()


@pytest.mark.slow
def test_a_cut_database_link_keeps_the_claims_of_running_tasks(scene: SqlScene) -> None:
    scene.workers.start("-P", "threads", "-c", "4")
    for n in range(4):
        scene.module.slow_record.delay(n, 5.0)
    for n in range(4, 8):  # held ahead of a free slot, not started: given back
        scene.module.slow_record.delay(n, 0.1)
    wait_until(lambda: len(scene.lines("start")) >= 4, 60, "the four slow tasks to start")
    assert scene.cut() >= 1
    wait_until(lambda: len(scene.lines("end")) >= 8, 90, "the eight tasks to end")
    time.sleep(2.0)  # a second run of any of them would start now
    starts = collections.Counter(line[1] for line in scene.lines("start"))
    assert starts == {str(n): 1 for n in range(8)}, scene.workers.log_text()[-5000:]
    wait_until(lambda: scene.rows() == 0, 30, "every late ack to reach the table")
    assert "Reconnected to" in scene.workers.log_text()
    assert scene.workers.stop() == [0], scene.workers.log_text()[-5000:]
