"""create_backend: choosing a backend by URL; the disabled backend's messages."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest

from taskframe import states
from taskframe.backends import BackendOptions, create_backend, scheme_of
from taskframe.backends.chord_counter import CounterChordStore
from taskframe.backends.database import DatabaseBackend
from taskframe.backends.disabled import DisabledBackend
from taskframe.backends.memory import MemoryBackend
from taskframe.backends.redis import RedisBackend
from taskframe.backends.redis_chord import RedisChordStore
from taskframe.errors import BackendNotConfigured, ImproperlyConfigured


@pytest.mark.parametrize(
    ("url", "scheme"),
    [("db+postgresql://u@h/db", "db"), ("sqlite:///x", "sqlite"), ("memory://", "memory"),
     ("disabled", "disabled"), ("REDIS://h", "redis")],
)
def test_scheme_of(url: str, scheme: str) -> None:
    assert scheme_of(url) == scheme


@pytest.mark.parametrize("url", [None, "", "disabled://", "disabled"])
def test_no_url_means_disabled(url: str | None) -> None:
    assert isinstance(create_backend(url, BackendOptions()), DisabledBackend)


def test_known_schemes(tmp_path: Path) -> None:
    assert isinstance(create_backend("memory://", BackendOptions()), MemoryBackend)
    for url in (f"sqlite:///{tmp_path}/a.sqlite3", f"db+sqlite:///{tmp_path}/b.sqlite3"):
        backend = create_backend(url, BackendOptions())
        assert isinstance(backend, DatabaseBackend)
        backend.close()


def test_unknown_scheme_lists_the_known_ones() -> None:
    with pytest.raises(ImproperlyConfigured, match=r"'nosuch'.*db://.*memory://"):
        create_backend("nosuch://host", BackendOptions())


def test_unknown_serializer_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ImproperlyConfigured, match="result_serializer"):
        create_backend(f"sqlite:///{tmp_path}/c.sqlite3", BackendOptions(serializer="nope"))


def test_disabled_backend_drops_writes_and_refuses_reads() -> None:
    backend = create_backend(None, BackendOptions())
    meta = backend.store_result("t1", 42, states.SUCCESS)
    assert meta["status"] == states.SUCCESS and meta["result"] == 42
    assert backend.mark_as_revoked("t1")["status"] == states.REVOKED
    backend.forget("t1")
    backend.save_group("g", [["g", None], []])
    backend.delete_group("g")
    for read in (lambda: backend.get_task_meta("t1"), lambda: backend.wait_for("t1", 1),
                 lambda: backend.restore_group("g"), lambda: backend.incr("k")):
        with pytest.raises(BackendNotConfigured, match="result_backend"):
            read()


def test_each_backend_says_how_it_counts_chords() -> None:
    class NoCounter(MemoryBackend):
        implements_incr: ClassVar[bool] = False

    memory = MemoryBackend()
    store = memory.chord_store()
    assert isinstance(store, CounterChordStore) and store.backend is memory
    assert NoCounter().chord_store() is None  # celery.chord_unlock polls
    redis_backend = RedisBackend("redis://127.0.0.1:1/0")  # connects on first use only
    try:
        assert isinstance(redis_backend.chord_store(), RedisChordStore)
    finally:
        redis_backend.close()


def test_the_counter_store_adds_a_part_only_to_a_recorded_header() -> None:
    backend = MemoryBackend()
    store = backend.chord_store()
    assert store is not None
    with pytest.raises(ValueError, match="no header state"):
        store.add_part("g", "c")
    store.record_header("g", ["a", "b"])
    store.add_part("g", "c")
    saved = backend.restore_group("g")
    assert [child[0][0] for child in saved[1]] == ["a", "b", "c"]
