"""RedisBackend beyond the contract: Celery's keys, TTLs, pub/sub, leaks, reconnects, errors."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import services

from taskframe import states
from taskframe.backends import BackendOptions, create_backend
from taskframe.backends.redis import RedisBackend
from taskframe.errors import BackendError, ImproperlyConfigured
from taskframe.errors import TimeoutError as ResultTimeout
from taskframe.protocol import group_tuple, result_tuple

pytestmark = pytest.mark.redis
DB = 11


@pytest.fixture
def prefix() -> Iterator[str]:
    name = f"tf-rb-{uuid.uuid4().hex[:10]}:"
    yield name
    services.redis_delete_prefix(DB, name)


@pytest.fixture
def admin() -> Iterator[redis.Redis]:
    services.redis_url(DB)
    client = redis.Redis(host="127.0.0.1", port=6379, db=DB)
    yield client
    client.close()


def make(prefix: str, **options: Any) -> RedisBackend:
    transport = {"global_keyprefix": prefix, **options.pop("transport_options", {})}
    backend = create_backend(services.redis_url(DB),
                             BackendOptions(transport_options=transport, **options))
    assert isinstance(backend, RedisBackend)
    return backend


@pytest.fixture
def backend(prefix: str) -> Iterator[RedisBackend]:
    made = make(prefix)
    yield made
    made.close()


def test_celery_keys_json_and_ttl(backend: RedisBackend, admin: redis.Redis, prefix: str) -> None:
    backend.mark_as_done("t1", {"v": [1, 2]})
    key = f"{prefix}celery-task-meta-t1"
    stored = json.loads(admin.get(key) or b"null")
    assert stored["status"] == "SUCCESS" and stored["result"] == {"v": [1, 2]}
    assert stored["task_id"] == "t1" and stored["children"] == []
    assert list(stored) == ["status", "result", "traceback", "children", "date_done", "task_id"]
    assert 0 < admin.ttl(key) <= 86400
    backend.save_group("g1", group_tuple("g1", [result_tuple("t1")]))
    group = json.loads(admin.get(f"{prefix}celery-taskset-meta-g1") or b"null")
    assert group["result"] == [["g1", None], [[["t1", None], None]]]
    assert backend.incr("chord-unlock-g1") == 1
    assert 0 < admin.ttl(f"{prefix}chord-unlock-g1") <= 86400
    backend.forget("t1")
    assert admin.exists(key) == 0


def test_no_expiry_means_plain_set(prefix: str, admin: redis.Redis) -> None:
    backend = make(prefix, expires=None)
    try:
        backend.mark_as_done("forever", 1)
        assert admin.ttl(f"{prefix}celery-task-meta-forever") == -1
    finally:
        backend.close()


@pytest.mark.parametrize(("given", "used"), [("app", "app_"), ("app:", "app:"), ("a-", "a-"),
                                             ("a.", "a."), ("a_", "a_"), ("", "")])
def test_global_keyprefix_rule(given: str, used: str) -> None:
    backend = make(given)
    try:
        assert backend.task_key("x") == f"{used}celery-task-meta-x"
        assert backend.group_key("g") == f"{used}celery-taskset-meta-g"
    finally:
        backend.close()


def test_store_publishes_the_stored_bytes(backend: RedisBackend, admin: redis.Redis) -> None:
    key = backend.task_key("pub-1")
    with admin.pubsub(ignore_subscribe_messages=True) as sub:
        sub.subscribe(key)
        sub.get_message(timeout=5)  # the subscription's confirmation
        backend.mark_as_started("pub-1")
        backend.mark_as_done("pub-1", 5)
        seen = []
        while len(seen) < 2:
            message = sub.get_message(timeout=10)
            assert message is not None, "a store was not published"
            seen.append(message["data"])
    assert [json.loads(d)["status"] for d in seen] == ["STARTED", "SUCCESS"]
    assert seen[1] == admin.get(key)


def test_many_waits_leave_no_subscription(backend: RedisBackend, admin: redis.Redis,
                                          prefix: str) -> None:
    pending = [f"pending-{i}" for i in range(100)]
    for task_id in pending:
        backend.mark_as_started(task_id)
    # 9,900 waits take the whole path: subscribe, GET, wait, time out, unsubscribe...
    for _ in range(99):
        for task_id in pending:
            with pytest.raises(ResultTimeout):
                backend.wait_for(task_id, timeout=0.0001)
    # ...and 100 are woken by the store's PUBLISH while subscribed.
    for task_id in pending:
        timer = threading.Timer(0.005, backend.mark_as_done, args=(task_id, "late"))
        timer.start()
        assert backend.wait_for(task_id, timeout=30)["result"] == "late"
        timer.join()
    assert len(backend._waiter._idle) >= 1  # the subscriber connection is reused...
    # ...its last UNSUBSCRIBE sent but not waited for; checked out (which reads the
    # confirmation), it has no subscription, and the server agrees.
    idle = len(backend._waiter._idle)
    subs = [backend._waiter._checkout() for _ in range(idle)]
    assert all(not sub.subscribed and not sub.channels for sub in subs)
    for sub in subs:
        backend._waiter._checkin(sub, clean=True)
    assert len(backend._waiter._idle) == idle
    channels = [backend.task_key(t) for t in pending]
    assert all(count == 0 for _, count in admin.pubsub_numsub(*channels))
    assert admin.pubsub_channels(f"{prefix}*") == []


def _kill_clients(admin: redis.Redis, name: str) -> int:
    killed = 0
    for client in admin.client_list():
        if client.get("name") == name:
            killed += int(admin.execute_command("CLIENT", "KILL", "ID", client["id"]) or 0)
    return killed


def _subscribed_clients(admin: redis.Redis, name: str) -> int:
    return sum(1 for c in admin.client_list() if c.get("name") == name and int(c["sub"]) > 0)


def test_wait_for_survives_a_dropped_connection(prefix: str, admin: redis.Redis) -> None:
    name = f"tf-waiter-{uuid.uuid4().hex[:8]}"
    waiter = make(prefix, transport_options={"client_name": name})
    writer = make(prefix)
    try:
        waiter.mark_as_started("drop-1")
        got: list[Any] = []
        thread = threading.Thread(target=lambda: got.append(waiter.wait_for("drop-1", 60)))
        thread.start()
        for _ in range(3000):
            if _subscribed_clients(admin, name):
                break
            time.sleep(0.01)
        assert _subscribed_clients(admin, name) == 1, "the waiter never subscribed"
        assert _kill_clients(admin, name) >= 1
        writer.mark_as_done("drop-1", "after the drop")
        thread.join(60)
        assert got and got[0]["result"] == "after the drop"
        # The reads of the same backend reconnect too.
        assert _kill_clients(admin, name) >= 1
        assert waiter.get_task_meta("drop-1")["status"] == states.SUCCESS
    finally:
        waiter.close()
        writer.close()


def test_idle_subscriber_dropped_before_its_unsubscribe_was_read(prefix: str,
                                                                  admin: redis.Redis) -> None:
    # A waiter sends UNSUBSCRIBE and returns; the subscriber goes back idle with the
    # confirmation unread. If its connection drops meanwhile, the next wait takes another.
    name = f"tf-idle-{uuid.uuid4().hex[:8]}"
    waiter = make(prefix, transport_options={"client_name": name})
    try:
        for i in range(2):
            waiter.mark_as_started(f"idle-{i}")
        threading.Timer(0.05, waiter.mark_as_done, args=("idle-0", 0)).start()
        assert waiter.wait_for("idle-0", 30)["result"] == 0
        [idle] = waiter._waiter._idle
        assert idle.subscribed  # the unsubscription is not confirmed yet
        assert _kill_clients(admin, name) >= 1
        threading.Timer(0.05, waiter.mark_as_done, args=("idle-1", 1)).start()
        assert waiter.wait_for("idle-1", 30)["result"] == 1
        assert waiter._waiter._idle and waiter._waiter._idle[0] is not idle
    finally:
        waiter.close()


def test_unreachable_server_is_a_backend_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again when the block ends: nobody listens
    backend = create_backend(f"redis://127.0.0.1:{port}/0",
                             BackendOptions(transport_options={"max_retries": 1}))
    try:
        with pytest.raises(BackendError, match="attempts") as info:
            backend.get_task_meta("x")
        assert isinstance(info.value.__cause__, redis.exceptions.ConnectionError)
        with pytest.raises(BackendError):
            backend.wait_for("x", timeout=5)
        with pytest.raises(BackendError):
            backend.mark_as_done("x", 1)
    finally:
        backend.close()
        backend.close()  # idempotent


def test_url_forms() -> None:
    with pytest.raises(ImproperlyConfigured, match="master_name"):
        create_backend("sentinel://127.0.0.1:26379/0", BackendOptions())
    sock = create_backend("redis+socket:///tmp/tf-nosuch.sock?virtual_host=3", BackendOptions())
    assert isinstance(sock, RedisBackend) and sock.db == 3
    sock.close()
    tls = create_backend("rediss://:secret@127.0.0.1:6380/4?global_keyprefix=p",
                         BackendOptions())
    assert isinstance(tls, RedisBackend) and tls.db == 4 and tls.keyprefix == "p_"
    assert "secret" not in repr(tls)
    tls.close()
