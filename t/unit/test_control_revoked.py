"""The revoked set, the --statedb file, the shared revoke store, and mailbox messages."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from taskframe import Taskframe
from taskframe.control.mailbox import ControlRequest, LamportClock, Mailbox, node_matches
from taskframe.control.revoked import RevokedSet, StateDB, store_for


def test_revoked_set_bounds_and_expiry() -> None:
    revoked = RevokedSet(maxlen=3, expires=60.0)
    for i in range(5):
        revoked.add(f"t{i}")
    assert revoked.ids() == ["t2", "t3", "t4"]
    assert "t0" not in revoked and "t4" in revoked
    revoked.update({"old": time.time() - 1})
    assert "old" not in revoked
    revoked.add("soon", time.time() + 0.05)
    assert "soon" in revoked
    deadline = time.time() + 5
    while "soon" in revoked and time.time() < deadline:
        time.sleep(0.02)
    assert "soon" not in revoked
    revoked.discard("t4")
    assert "t4" not in revoked


def test_revoked_stamps() -> None:
    revoked = RevokedSet()
    revoked.add_stamps({"tenant": "a", "batch": [1, 2]})
    assert revoked.matches_stamps({"batch": 2})
    assert revoked.matches_stamps({"tenant": ["z", "a"]})
    assert not revoked.matches_stamps({"tenant": "b"})
    assert not revoked.matches_stamps({})


def test_statedb_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "worker.state"
    db = StateDB(str(path))
    assert db.load() == {}
    later = time.time() + 100
    db.save({"a": later, "gone": time.time() - 1}, clock=7)
    assert db.load() == {"a": later}
    assert json.loads(path.read_text())["clock"] == 7
    path.write_text("not json")
    assert db.load() == {}


def test_store_in_the_result_backend() -> None:
    app = Taskframe("rs", broker="memory://rs", backend="memory://", set_as_current=False)
    try:
        store = store_for(app)
        assert store is not None
        first = store.version()
        store.add(["x", "y"], 60.0)
        assert store.version() != first
        store.add(["z"], 60.0)
        assert set(store.load()) == {"x", "y", "z"}
        assert set(app.backend.load_revokes()) == {"x", "y", "z"}
        store.add(["gone"], -1.0)  # already expired: never loaded
        assert "gone" not in store.load()
    finally:
        app.close()


def test_no_store_without_a_backend_that_keeps_revokes() -> None:
    app = Taskframe("rs", broker="memory://rs", backend="rpc://", set_as_current=False)
    try:
        assert store_for(app) is None  # rpc stores nothing: revokes stay in worker memory
    finally:
        app.close()


def test_revoke_sync_catches_up_only_when_the_store_changed() -> None:
    from taskframe.control_server.revoke_sync import RevokeSync

    app = Taskframe("rs", broker="memory://rs", backend="memory://", set_as_current=False)
    try:
        store = store_for(app)
        assert store is not None
        loads: list[int] = []
        load = store.load
        store.load = lambda: loads.append(1) or load()  # type: ignore[method-assign]
        store.add(["known"], 60.0)
        revoked = RevokedSet()
        revoked.update(store.load())  # as the worker loads it at start
        learned: list[list[str]] = []
        sync = RevokeSync(revoked, store, interval=0.05, on_learned=learned.append)
        assert sync.sync() == 0 and len(loads) == 2  # the first look loads...
        assert learned == [["known"]]  # ...and hands on every id (REVOKED stored)
        assert sync.sync() == 0 and len(loads) == 2  # nothing added: one version read
        store.add(["missed"], 60.0)  # a revoke this worker did not hear
        assert sync.sync() == 1 and "missed" in revoked and len(loads) == 3
        assert learned[-1] == ["missed"]
        sync.start()
        store.add(["later"], 60.0)
        deadline = time.time() + 10
        while "later" not in revoked and time.time() < deadline:
            time.sleep(0.02)
        sync.stop()
        assert "later" in revoked
    finally:
        app.close()


def test_request_body_round_trip_and_filter() -> None:
    request = ControlRequest("ping", {}, destination=["a@h"], ticket="t",
                             reply_to={"exchange": "reply.celery.pidbox", "routing_key": "o"})
    body = request.to_body()
    assert body == {"method": "ping", "arguments": {}, "destination": ["a@h"], "pattern": None,
                    "matcher": None, "ticket": "t",
                    "reply_to": {"exchange": "reply.celery.pidbox", "routing_key": "o"}}
    again = ControlRequest.from_body(body)
    assert again == request
    assert again.is_for("a@h") and not again.is_for("b@h")
    assert "ticket" not in ControlRequest("ping").to_body()
    assert node_matches("w1@x", None, "w*@x", "glob")
    assert not node_matches("v1@x", None, "w*@x", "glob")
    assert node_matches("w1@x", None, r"^w\d@", "pcre")
    assert node_matches("any", None, None, None)


def test_mailbox_names_follow_celery() -> None:
    mailbox = Mailbox("celery")
    node = mailbox.node_queue("w1@host")
    assert node.name == "w1@host.celery.pidbox"
    assert node.bound_exchange.name == "celery.pidbox" and node.bound_exchange.type == "fanout"
    assert not node.durable and node.auto_delete
    assert node.arguments == {"x-expires": 10000, "x-message-ttl": 300000}
    oid = uuid.uuid4().hex
    reply = mailbox.reply_queue(oid)
    assert reply.name == f"{oid}.reply.celery.pidbox" and reply.bound_routing_key == oid
    assert reply.bound_exchange.name == "reply.celery.pidbox"


def test_lamport_clock() -> None:
    clock = LamportClock()
    assert clock.forward() == 1
    assert clock.adjust(10) == 11
    assert clock.adjust("garbage") == 12


def test_worker_start_loads_the_statedb_and_the_store(tmp_path: Path) -> None:
    from taskframe.control_server.worker_adapter import load_revoked

    path = tmp_path / "w.state"
    StateDB(str(path)).save({"from-file": time.time() + 60})
    bare = Taskframe("lr", broker="memory://lr", set_as_current=False)
    try:
        revoked, db, store = load_revoked(bare, str(path))
        assert revoked.ids() == ["from-file"] and db is not None and store is None
    finally:
        bare.close()
    full = Taskframe("lr2", broker="memory://lr2", backend="memory://", set_as_current=False)
    try:
        shared = store_for(full)
        assert shared is not None
        shared.add(["from-store"], 60.0)
        revoked, _, store = load_revoked(full, str(path))
        assert set(revoked.ids()) == {"from-file", "from-store"} and store is not None
    finally:
        full.close()
