"""Store + read N results per backend: taskframe's backends against Celery's on the same store.

One run, same machine, same servers: Redis (db 13, a unique key prefix, deleted after), SQLite
(a temporary file each) and PostgreSQL (unique table names, dropped after). Prints a table of
round trips per second and the taskframe/Celery ratio.

    .venv/bin/python t/benchmarks/bench_backends.py [-n 10000] [--only redis,sqlite,postgresql]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa
from celery import Celery

from taskframe.backends import BackendOptions, create_backend

REDIS = "redis://127.0.0.1:6379/13"
POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


def _rounds(n: int, store: Callable[[str, int], Any], get: Callable[[str], Any]) -> float:
    ids = [str(uuid.uuid4()) for _ in range(n)]
    start = time.perf_counter()
    for i, task_id in enumerate(ids):
        store(task_id, i)
        get(task_id)
    return n / (time.perf_counter() - start)


def run_taskframe(url: str, n: int, options: BackendOptions) -> float:
    backend = create_backend(url, options)
    try:
        return _rounds(n, lambda tid, v: backend.mark_as_done(tid, v), backend.get_task_meta)
    finally:
        backend.close()


def run_celery(url: str, n: int, conf: dict[str, Any]) -> float:
    app = Celery("bench", backend=url, set_as_current=False)
    app.conf.update(conf)
    backend = app.backend
    try:
        return _rounds(n, lambda tid, v: backend.store_result(tid, v, "SUCCESS"),
                       backend.get_task_meta)
    finally:
        app.close()


def case_redis(n: int) -> tuple[float, float]:
    prefix = f"bench{uuid.uuid4().hex[:8]}_"
    try:
        ours = run_taskframe(REDIS, n, BackendOptions(
            transport_options={"global_keyprefix": prefix + "tf_"}))
        theirs = run_celery(REDIS, n, {"result_backend_transport_options":
                                       {"global_keyprefix": prefix + "ce_"}})
    finally:
        client = redis.Redis.from_url(REDIS)
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()
    return ours, theirs


def case_sqlite(n: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        ours = run_taskframe(f"db+sqlite:///{Path(tmp) / 'tf.db'}", n, BackendOptions())
        theirs = run_celery(f"db+sqlite:///{Path(tmp) / 'ce.db'}", n, {})
    return ours, theirs


def case_postgresql(n: int) -> tuple[float, float]:
    prefix = f"bench{uuid.uuid4().hex[:8]}_"
    names = {"task": f"{prefix}taskmeta", "group": f"{prefix}tasksetmeta"}
    try:
        ours = run_taskframe(f"db+{POSTGRES}", n, BackendOptions(table_names=names))
        theirs_names = {"task": f"{prefix}ce_taskmeta", "group": f"{prefix}ce_tasksetmeta"}
        theirs = run_celery(f"db+{POSTGRES.replace('postgresql://', 'postgresql+psycopg://')}",
                            n, {"database_table_names": theirs_names})
    finally:
        engine = sa.create_engine(POSTGRES.replace("postgresql://", "postgresql+psycopg://"))
        with engine.begin() as conn:
            for table in sa.inspect(conn).get_table_names():
                if table.startswith(prefix):
                    conn.execute(sa.text(f'DROP TABLE IF EXISTS "{table}"'))
        engine.dispose()
    return ours, theirs


CASES = {"redis": case_redis, "sqlite": case_sqlite, "postgresql": case_postgresql}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10000)
    parser.add_argument("--only", default=",".join(CASES))
    args = parser.parse_args()
    print(f"{args.n} store + get round trips per backend")
    print(f"{'backend':14}{'taskframe/s':>14}{'celery/s':>12}{'ratio':>8}")
    for name in args.only.split(","):
        ours, theirs = CASES[name](args.n)
        print(f"{name:14}{ours:14.0f}{theirs:12.0f}{ours / theirs:8.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
