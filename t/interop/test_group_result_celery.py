"""GroupResult.save/restore share Celery's wire form: Celery 5.7 restores ours and we restore
Celery's, on the Redis and the database (SQLite) backends."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import celery
import celery.result
import pytest
import services

from taskframe import GroupResult, Taskframe
from taskframe.result import AsyncResult

pytestmark = pytest.mark.interop
DB = 11


@pytest.fixture(params=["redis", "sqlite"])
def apps(request: pytest.FixtureRequest,
         tmp_path: Path) -> Iterator[tuple[Taskframe, celery.Celery]]:
    """Our app and a Celery app on the same result store."""
    prefix = f"tf-grc-{uuid.uuid4().hex[:10]}:"
    if request.param == "redis":
        url = services.redis_url(DB)
        options = {"global_keyprefix": prefix}
    else:
        url = f"db+sqlite:///{tmp_path}/results.sqlite3"
        options = {}
    ours = Taskframe("grc", broker="memory://", backend=url, set_as_current=False)
    ours.conf.result_backend_transport_options = options
    theirs = celery.Celery("grc", broker="memory://", backend=url, set_as_current=False)
    theirs.conf.result_backend_transport_options = options
    yield ours, theirs
    theirs.close()
    ours.close()
    if request.param == "redis":
        services.redis_delete_prefix(DB, prefix)


def test_celery_restores_our_group(apps: tuple[Taskframe, celery.Celery]) -> None:
    ours, theirs = apps
    ids = [str(uuid.uuid4()) for _ in range(3)]
    for i, task_id in enumerate(ids):
        ours.backend.mark_as_done(task_id, i * 2)
    inner = GroupResult(str(uuid.uuid4()), [ours.AsyncResult(ids[2])], app=ours)
    parent = AsyncResult(str(uuid.uuid4()), app=ours)
    group = GroupResult(str(uuid.uuid4()), [ours.AsyncResult(ids[0]), ours.AsyncResult(ids[1]),
                                            inner], parent, app=ours)
    group.save()

    restored = celery.result.GroupResult.restore(group.id, app=theirs)
    assert restored is not None and restored.id == group.id
    assert [type(r).__name__ for r in restored.results] == [
        "AsyncResult", "AsyncResult", "GroupResult"]
    assert [r.id for r in restored.results] == [ids[0], ids[1], inner.id]
    assert restored.results[2].results[0].id == ids[2]
    assert restored.parent is not None and restored.parent.id == parent.id
    assert restored.as_tuple() == celery.result.result_from_tuple(
        group.as_tuple(), theirs).as_tuple()
    assert restored.get(timeout=10) == [0, 2, [4]]
    assert restored.completed_count() == 3  # a nested group counts as one, when it succeeded

    group.delete()
    assert celery.result.GroupResult.restore(group.id, app=theirs) is None


def test_we_restore_celerys_group(apps: tuple[Taskframe, celery.Celery]) -> None:
    ours, theirs = apps
    ids = [str(uuid.uuid4()) for _ in range(3)]
    theirs.backend.store_result(ids[0], "a", "SUCCESS")
    theirs.backend.mark_as_failure(ids[1], KeyError("lost"))
    theirs.backend.store_result(ids[2], {"n": 1}, "SUCCESS")
    inner = theirs.GroupResult(str(uuid.uuid4()), [theirs.AsyncResult(ids[2])])
    parent = theirs.AsyncResult(str(uuid.uuid4()))
    group = theirs.GroupResult(str(uuid.uuid4()), [theirs.AsyncResult(ids[0]),
                                                   theirs.AsyncResult(ids[1]), inner],
                               parent=parent)
    group.save()

    restored = GroupResult.restore(group.id, app=ours)
    assert restored is not None and restored.id == group.id
    assert restored.parent is not None and str(restored.parent) == parent.id
    assert [str(r) for r in restored] == [ids[0], ids[1], inner.id]
    assert isinstance(restored[2], GroupResult) and restored[2].results == [ids[2]]
    assert restored.as_tuple() == ours.backend.restore_group(group.id)
    with pytest.raises(KeyError, match="lost"):
        restored.get(timeout=10)
    values = restored.join_native(timeout=10, propagate=False)
    assert values[0] == "a" and isinstance(values[1], KeyError) and values[2] == [{"n": 1}]
    assert restored.ready() and restored.failed() and restored.completed_count() == 2

    restored.delete()
    assert theirs.GroupResult.restore(group.id) is None
