"""Canvases cross over between Celery 5.7 and taskframe (Redis broker, Redis result backend).

* Chains, groups and chords built by the real ``celery`` package run on a taskframe worker.
* Chains, groups and chords built by taskframe run on a real Celery worker.
* One chord whose header tasks are shared by a Celery worker and a taskframe worker is
  counted in the same Redis keys (Celery's ``celery-taskset-meta-<gid>.j/.s/.t``) and its
  body runs exactly once.

The projects are ``t/integration/canvasproj/cvproj.py`` (taskframe) and ``cvcelery.py``
(Celery), with the same task names.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import services
from workers import stop_processes, wait_until, watch

pytestmark = [pytest.mark.interop, pytest.mark.redis, pytest.mark.slow]

PROJ_DIR = Path(__file__).parent.parent / "integration" / "canvasproj"
T = 60.0
ENV_KEYS = ("CV_BROKER", "CV_BACKEND", "CV_PREFIX", "CV_QUEUE", "CV_REDIS")


class Side:
    """Environment, both projects imported here, and the worker processes started."""

    def __init__(self, tmp_path: Path, backend: str | None = None) -> None:
        url = services.redis_url()
        self.prefix = f"tfcvi{uuid.uuid4().hex[:8]}."
        self.backend = backend or url
        values = {"CV_BROKER": url, "CV_BACKEND": self.backend, "CV_PREFIX": self.prefix,
                  "CV_QUEUE": f"{self.prefix}q", "CV_REDIS": url}
        self.saved = {key: os.environ.get(key) for key in ENV_KEYS}
        os.environ.update(values)
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(PROJ_DIR), os.environ.get("PYTHONPATH", "")])}
        sys.path.insert(0, str(PROJ_DIR))
        for name in ("cvproj", "cvcelery"):
            sys.modules.pop(name, None)
        import cvcelery
        import cvproj

        self.tf: Any = cvproj
        self.cel: Any = cvcelery
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        self.redis = redis.Redis.from_url(url)

    def start_taskframe(self) -> None:
        self._start([sys.executable, "-m", "taskframe", "-A", "cvproj", "worker",
                     "-P", "threads", "-c", "4", "-l", "INFO"])

    def start_celery(self) -> None:
        self._start([sys.executable, "-m", "celery", "-A", "cvcelery", "worker", "-P", "threads",
                     "-c", "4", "--without-mingle", "--without-gossip", "-l", "INFO"])

    def _start(self, argv: list[str]) -> None:
        log = self.tmp_path / f"worker{len(self.procs)}.log"
        self.procs.append(subprocess.Popen(argv, env=self.env, cwd=PROJ_DIR,
                                           stdout=log.open("wb"), stderr=subprocess.STDOUT))
        watch(self.procs[-1], log)
        self.logs.append(log)

    def log_text(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in self.logs)

    def close(self) -> None:
        stop_processes(self.procs)
        self.tf.app.close()
        self.cel.app.close()
        for name in ("cvproj", "cvcelery"):
            sys.modules.pop(name, None)
        if str(PROJ_DIR) in sys.path:
            sys.path.remove(str(PROJ_DIR))
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self.redis.close()
        services.redis_delete_prefix(0, self.prefix)
        if self.backend.startswith("db+"):
            import sqlalchemy as sa

            engine = sa.create_engine(services.postgres_url().replace(
                "postgresql://", "postgresql+psycopg://", 1))
            with engine.begin() as conn:
                for name in ("taskmeta", "tasksetmeta", "counters"):
                    table = self.prefix.replace(".", "_") + name
                    conn.execute(sa.text(f'DROP TABLE IF EXISTS "{table}"'))
            engine.dispose()


@pytest.fixture
def side(tmp_path: Path) -> Iterator[Side]:
    s = Side(tmp_path)
    yield s
    s.close()


def test_celery_canvases_run_on_a_taskframe_worker(side: Side) -> None:
    import celery
    import celery.exceptions

    c = side.cel
    side.start_taskframe()
    chain = c.add.s(1, 2) | c.add.s(3) | c.mul.si(2, 5) | c.mul.s(3)
    assert chain.delay().get(timeout=T) == 30, side.log_text()
    header = [c.add.s(i, i) for i in range(10)]
    assert celery.chord(header)(c.tsum.s()).get(timeout=T) == 90, side.log_text()
    assert celery.group(c.add.s(i, 1) for i in range(5)).delay().get(timeout=T) == \
        [1, 2, 3, 4, 5]
    nested = celery.chain(c.add.s(1, 1), celery.chord([c.add.s(i) for i in range(3)],
                                                      c.tsum.s()), c.mul.s(10))
    assert nested.delay().get(timeout=T) == 90, side.log_text()
    # Celery's client unrolls a group in a header and numbers its members in reverse
    # (group_index); a taskframe worker keeps the order those numbers give.
    unrolled = celery.chord([celery.group(c.add.s(1, 1), c.add.s(2, 2), c.add.s(5, 5)),
                             c.add.s(3, 3)], c.ident.s())
    assert unrolled.delay().get(timeout=T) == [10, 4, 2, 6], side.log_text()
    # A header member whose result is a group: one list element (Celery saves the shape).
    gathered = celery.chord([c.add.s(1, 1) | celery.group(c.add.s(1), c.add.s(2)),
                             celery.chord([c.add.s(1, 1), c.add.s(2, 2)],
                                          celery.group(c.ident.s(), c.ident.s()))],
                            c.ident.s())
    assert gathered.delay().get(timeout=T) == [[3, 4], [[2, 4], [2, 4]]], side.log_text()
    failing = celery.chord([c.add.s(1, 1), c.boom.s()], c.tsum.s()).delay()
    body = c.app.AsyncResult(failing.id)  # without the header parent Celery re-raises first
    with pytest.raises(celery.exceptions.ChordError, match="boom"):
        body.get(timeout=T)


def test_taskframe_canvases_run_on_a_celery_worker(side: Side) -> None:
    from taskframe.canvas import chain, chord, group
    from taskframe.errors import ChordError

    t = side.tf
    side.start_celery()
    assert (t.add.s(1, 2) | t.add.s(3) | t.mul.si(2, 5) | t.mul.s(3)).delay().get(
        timeout=T) == 30, side.log_text()
    assert chord([t.add.s(i, i) for i in range(10)])(t.tsum.s()).get(timeout=T) == 90, \
        side.log_text()
    assert group(t.add.s(i, 1) for i in range(5)).delay().get(timeout=T) == [1, 2, 3, 4, 5]
    nested = chain(t.add.s(1, 1), chord([t.add.s(i) for i in range(3)], t.tsum.s()),
                   t.mul.s(10))
    assert nested.delay().get(timeout=T) == 90, side.log_text()
    grouped = chord([group(t.add.s(1, 1), t.add.s(2, 2)), t.add.s(3, 3) | group(
        t.add.s(1), t.add.s(2))], t.ident.s())
    assert grouped.delay().get(timeout=T) == [2, 4, [7, 8]], side.log_text()
    failing = chord([t.add.s(1, 1), t.boom.s()], t.tsum.s()).delay()
    with pytest.raises(ChordError):
        failing.get(timeout=T)


@pytest.mark.parametrize("client", ["celery", "taskframe"])
def test_one_chord_counted_by_both_kinds_of_worker(side: Side, client: str) -> None:
    side.start_celery()
    side.start_taskframe()
    wait_until(lambda: all(" ready" in log.read_text() for log in side.logs if log.exists())
               and all(log.exists() for log in side.logs), T, "both workers ready")
    project = side.cel if client == "celery" else side.tf
    if client == "celery":
        import celery

        build: Any = celery.chord
    else:
        from taskframe.canvas import chord as build
    result = build([project.add.s(i, 0) for i in range(300)])(project.count_body.s())
    assert result.get(timeout=T) == [1, 300, sum(range(300))], side.log_text()
    logs = side.log_text()
    assert logs.count("cv.add[") > 0
    # Both kinds of worker ran header tasks, and the body ran once.
    texts = [log.read_text() for log in side.logs]
    assert all("cv.add[" in text for text in texts), logs
    assert int(side.redis.get(f"{side.prefix}body-runs") or 0) == 1


def test_celery_chord_on_the_database_backend_completes_by_chord_unlock(tmp_path: Path) -> None:
    """Celery has no chord counter for its database backend: its client sends
    ``celery.chord_unlock``, which the taskframe worker runs (polling) to send the body."""
    import celery

    db = services.postgres_url().replace("postgresql://", "db+postgresql://", 1)
    side = Side(tmp_path, backend=db)
    try:
        c = side.cel
        side.start_taskframe()
        result = celery.chord([c.add.s(i, i) for i in range(5)])(c.tsum.s())
        assert result.get(timeout=T) == 20, side.log_text()
        gathered = celery.chord([c.add.s(1, 1) | celery.group(c.add.s(1), c.add.s(2)),
                                 c.add.s(3, 3)], c.ident.s())
        assert gathered.delay().get(timeout=T) == [[3, 4], 6], side.log_text()
        assert "celery.chord_unlock[" in side.log_text()
    finally:
        side.close()
