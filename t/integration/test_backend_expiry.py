"""Per-store expiry and session settings: result_failure_expires on Redis and GCS,
database_short_lived_sessions on PostgreSQL, the GCS lifecycle-rule check."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import gcs_emulator
import pytest
import redis
import services
import sqlalchemy as sa
from google.cloud import storage  # type: ignore[attr-defined]

from taskframe.backends import BackendOptions, create_backend
from taskframe.backends.database import DatabaseBackend
from taskframe.backends.gcs import GCSBackend
from taskframe.backends.redis import RedisBackend

DB = 11


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    prefix = f"tf-expiry-{uuid.uuid4().hex[:10]}:"
    yield prefix
    services.redis_delete_prefix(DB, prefix)


def test_redis_failure_results_get_their_own_ttl(redis_prefix: str) -> None:
    backend = create_backend(services.redis_url(DB), BackendOptions(
        expires=3600.0, failure_expires=120.0,
        transport_options={"global_keyprefix": redis_prefix}))
    assert isinstance(backend, RedisBackend)
    client = redis.Redis(host="127.0.0.1", port=6379, db=DB)
    try:
        backend.mark_as_done("ok", 1)
        backend.mark_as_failure("bad", ValueError("x"))
        backend.mark_as_retry("retrying", ValueError("x"))
        assert 3590 < client.ttl(backend.task_key("ok")) <= 3600
        assert 110 < client.ttl(backend.task_key("bad")) <= 120
        assert 3590 < client.ttl(backend.task_key("retrying")) <= 3600  # FAILURE only
    finally:
        client.close()
        backend.close()


def _connections(application_name: str) -> int:
    admin = sa.create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/test")
    try:
        with admin.connect() as conn:
            return int(conn.execute(
                sa.text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :n"),
                {"n": application_name}).scalar_one())
    finally:
        admin.dispose()


@pytest.mark.parametrize("short_lived", [True, False])
def test_short_lived_sessions_hold_no_connection(short_lived: bool) -> None:
    suffix = uuid.uuid4().hex[:10]
    name = f"tf-short-{suffix}"
    tables = {"task": f"tf_task_{suffix}", "group": f"tf_group_{suffix}",
              "counter": f"tf_counter_{suffix}"}
    backend = create_backend("db+" + services.postgres_url(), BackendOptions(
        table_names=tables, short_lived_sessions=short_lived,
        engine_options={"connect_args": {"application_name": name}}))
    assert isinstance(backend, DatabaseBackend)
    try:
        backend.mark_as_done("t1", 1)
        assert backend.get_task_meta("t1")["result"] == 1
        assert backend.get_task_metas(["t1", "t2"])["t1"]["result"] == 1
        # Short-lived: every call closed its connection; pooled: one stays open.
        assert _connections(name) == (0 if short_lived else 1)
    finally:
        backend.close()
        engine = sa.create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/test")
        with engine.begin() as conn:
            for table in tables.values():
                conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")
        engine.dispose()


@pytest.fixture
def gcs_client() -> Iterator[storage.Client]:
    gcs_emulator.start()
    client = storage.Client(project=gcs_emulator.PROJECT)
    yield client
    client.close()


def _bucket(client: storage.Client, *, rule: bool) -> str:
    bucket = client.create_bucket(f"tf-lifecycle-{uuid.uuid4().hex[:10]}")
    # Set by PATCH: the emulator ignores lifecycle rules given at creation.
    if rule:
        bucket.add_lifecycle_delete_rule(days_since_custom_time=0)
    else:  # a Delete rule on age alone does not act on custom_time
        bucket.add_lifecycle_delete_rule(age=30)
    bucket.patch()
    return str(bucket.name)


@pytest.mark.parametrize("rule", [True, False])
def test_gcs_ttl_checks_the_lifecycle_rule(gcs_client: storage.Client, rule: bool,
                                           caplog: pytest.LogCaptureFixture) -> None:
    name = _bucket(gcs_client, rule=rule)
    url = f"gs://{name}/base?gcs_project={gcs_emulator.PROJECT}&gcs_ttl=3600"
    backend = create_backend(url, BackendOptions(failure_expires=60.0))
    assert isinstance(backend, GCSBackend)
    try:
        with caplog.at_level(logging.WARNING, logger="taskframe.backends.gcs"):
            backend.mark_as_done("ok", 1)  # works either way: the check only warns
            backend.mark_as_failure("bad", ValueError("x"))
        warnings = [r for r in caplog.records if "lifecycle rule" in r.getMessage()]
        assert len(warnings) == (0 if rule else 1)  # checked once, at first use
        now = datetime.now(UTC)
        ok = gcs_client.bucket(name).get_blob("base/celery-task-meta-ok")
        bad = gcs_client.bucket(name).get_blob("base/celery-task-meta-bad")
        assert now + timedelta(seconds=3000) < ok.custom_time <= now + timedelta(seconds=3600)
        assert now < bad.custom_time <= now + timedelta(seconds=60)  # result_failure_expires
    finally:
        backend.close()
        for blob in gcs_client.list_blobs(name):
            blob.delete()
        gcs_client.bucket(name).delete()


def test_gcs_without_ttl_does_not_check(gcs_client: storage.Client,
                                        caplog: pytest.LogCaptureFixture) -> None:
    name = _bucket(gcs_client, rule=False)
    backend = create_backend(f"gs://{name}/base?gcs_project={gcs_emulator.PROJECT}",
                             BackendOptions())
    try:
        with caplog.at_level(logging.WARNING, logger="taskframe.backends.gcs"):
            backend.mark_as_done("ok", 1)
        assert "lifecycle" not in caplog.text
    finally:
        backend.close()
        for blob in gcs_client.list_blobs(name):
            blob.delete()
        gcs_client.bucket(name).delete()
