"""GCSBackend beyond the contract: names, bytes, preconditions, CAS counter, Celery's reader."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import gcs_emulator
import pytest
from google.api_core import exceptions as gexc
from google.cloud import storage  # type: ignore[attr-defined]

from taskframe import states
from taskframe.backends import BackendOptions, create_backend
from taskframe.backends.gcs import GCSBackend
from taskframe.errors import ImproperlyConfigured
from taskframe.protocol import decode_result, group_tuple, result_tuple


@pytest.fixture
def base() -> Iterator[str]:
    path = f"tf-gcs-{uuid.uuid4().hex[:10]}"
    yield path
    gcs_emulator.delete_base_path(path)


@pytest.fixture
def bucket() -> Iterator[storage.Bucket]:
    gcs_emulator.start()
    client = storage.Client(project=gcs_emulator.PROJECT)
    yield client.bucket(gcs_emulator.BUCKET)
    client.close()


def make(base: str, **options: object) -> GCSBackend:
    backend = create_backend(gcs_emulator.backend_url(base), BackendOptions(**options))  # type: ignore[arg-type]
    assert isinstance(backend, GCSBackend)
    return backend


def test_object_names_and_bytes_are_celerys(base: str, bucket: storage.Bucket) -> None:
    backend = make(base)
    try:
        backend.mark_as_done("t1", {"v": [1, 2]})
        stored = json.loads(bucket.blob(f"{base}/celery-task-meta-t1").download_as_bytes())
        assert list(stored) == ["status", "result", "traceback", "children", "date_done",
                                "task_id"]
        assert stored["status"] == "SUCCESS" and stored["result"] == {"v": [1, 2]}
        backend.save_group("g1", group_tuple("g1", [result_tuple("t1")]))
        group = json.loads(bucket.blob(f"{base}/celery-taskset-meta-g1").download_as_bytes())
        assert group == {"result": [["g1", None], [[["t1", None], None]]]}
        assert backend.incr("chord-unlock-g1") == 1
        assert bucket.blob(f"{base}/chord-unlock-g1").download_as_bytes() == b"1"
    finally:
        backend.close()
        backend.close()  # idempotent


def test_the_emulator_enforces_generation_preconditions(base: str,
                                                         bucket: storage.Bucket) -> None:
    # Without this, the CAS counter tests below would pass against any counter.
    blob = bucket.blob(f"{base}/cas")
    blob.upload_from_string(b"1", if_generation_match=0)
    with pytest.raises(gexc.PreconditionFailed):
        bucket.blob(f"{base}/cas").upload_from_string(b"2", if_generation_match=0)
    current = bucket.get_blob(f"{base}/cas")
    assert current is not None
    generation = int(current.generation)
    bucket.blob(f"{base}/cas").upload_from_string(b"2", if_generation_match=generation)
    with pytest.raises(gexc.PreconditionFailed):
        bucket.blob(f"{base}/cas").upload_from_string(b"3", if_generation_match=generation)
    assert bucket.blob(f"{base}/cas").download_as_bytes() == b"2"


def test_counter_from_many_threads_is_exact(base: str) -> None:
    backends = [make(base) for _ in range(4)]
    seen: list[int] = []
    lock = threading.Lock()

    def work(backend: GCSBackend) -> None:
        for _ in range(15):
            value = backend.incr("chord-unlock-threads")
            with lock:
                seen.append(value)

    threads = [threading.Thread(target=work, args=(b,)) for b in backends]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(seen) == list(range(1, 61))
    for backend in backends:
        backend.close()


def test_parallel_reads_keep_order(base: str) -> None:
    backend = make(base)
    try:
        ids = [f"p-{i}" for i in range(12)]
        for i, task_id in enumerate(ids[:10]):
            backend.mark_as_done(task_id, i)
        metas = list(backend.get_task_metas(ids).values())
        assert [m["task_id"] for m in metas] == ids
        assert [m["result"] for m in metas[:10]] == list(range(10))
        assert [m["status"] for m in metas[10:]] == [states.PENDING] * 2
    finally:
        backend.close()


def test_ttl_sets_custom_time(base: str, bucket: storage.Bucket) -> None:
    backend = create_backend(gcs_emulator.backend_url(base) + "&gcs_ttl=3600",
                             BackendOptions())
    try:
        backend.mark_as_done("ttl-1", 1)
        blob = bucket.get_blob(f"{base}/celery-task-meta-ttl-1")
        assert blob is not None and blob.custom_time is not None
        assert blob.custom_time > datetime.now(UTC)
    finally:
        backend.close()


def test_bad_urls() -> None:
    with pytest.raises(ImproperlyConfigured, match="bucket"):
        create_backend("gs:///path", BackendOptions())
    with pytest.raises(ImproperlyConfigured):
        create_backend("gs://b/p?gcs_ttl=soon", BackendOptions())


@pytest.mark.interop
def test_celery_gcs_reader_and_writer_share_objects(base: str) -> None:
    import celery
    from celery.backends.gcs import GCSBackendBase

    url = gcs_emulator.backend_url(base)
    app = celery.Celery("interop-gcs", broker="memory://", set_as_current=False)
    theirs = GCSBackendBase(app=app, url=url)
    ours = make(base)
    try:
        ours.mark_as_done("ok-1", [1, "x"])
        ours.mark_as_failure("bad-1", ValueError("boom", 42))
        assert theirs.get_task_meta("ok-1")["result"] == [1, "x"]
        exc = theirs.get_task_meta("bad-1")["result"]
        assert type(exc) is ValueError and exc.args == ("boom", 42)
        theirs.store_result("ok-2", {"k": 3}, "SUCCESS")
        theirs.mark_as_failure("bad-2", KeyError("k"))
        assert ours.get_task_meta("ok-2")["result"] == {"k": 3}
        failed = decode_result(ours.get_task_meta("bad-2"))
        assert type(failed) is KeyError and failed.args == ("k",)
        kept = ours.mark_as_failure("ok-2", RuntimeError("duplicate"))
        assert kept["status"] == states.SUCCESS and kept["result"] == {"k": 3}
    finally:
        ours.close()
        app.close()
