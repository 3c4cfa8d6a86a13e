"""Remote-control handlers (``control_server.handlers``) on a recording ``WorkerState``."""

from __future__ import annotations

import signal
import time
from collections.abc import Collection, Iterator
from typing import Any

import pytest

from taskframe import Taskframe, states
from taskframe.control.mailbox import LamportClock
from taskframe.control.revoked import RevokedSet
from taskframe.control_server.contract import RequestView, WorkerState
from taskframe.control_server.handlers import HANDLERS, NO_REPLY, dispatch, signal_number
from taskframe.transport import Queue


class RecordingState:
    """A ``WorkerState`` holding plain lists, recording what handlers asked for."""

    hostname = "w1@example"

    def __init__(self, app: Taskframe) -> None:
        self.app = app
        self.revoked = RevokedSet(maxlen=100, expires=60.0)
        self.clock = LamportClock(41)
        self.started_at = time.time() - 5
        self.prefetch_count = 8
        self.running: list[RequestView] = []
        self.waiting: list[RequestView] = []
        self.later: list[RequestView] = []
        self.consumed = [Queue("celery")]
        self.calls: list[tuple[str, Any]] = []
        self.events_on = False
        self.resizable = True

    def active(self) -> list[RequestView]:
        return list(self.running)

    def reserved(self) -> list[RequestView]:
        return list(self.waiting)

    def scheduled(self) -> list[RequestView]:
        return list(self.later)

    def totals(self) -> dict[str, int]:
        return {"proj.add": 3}

    def pool_stats(self) -> dict[str, Any]:
        return {"implementation": "threads", "max-concurrency": 2, "processes": [1]}

    def queues(self) -> list[Queue]:
        return list(self.consumed)

    def health(self) -> dict[str, Any]:
        return {"status": "stalled", "stall": {"kind": "pool", "seconds": 61.0, "detail": "x"}}

    def add_consumer(self, queue: Queue) -> None:
        self.calls.append(("add_consumer", queue))

    def cancel_consumer(self, name: str) -> None:
        self.calls.append(("cancel_consumer", name))

    def set_rate_limit(self, task_name: str, limit: str | None) -> None:
        self.calls.append(("set_rate_limit", (task_name, limit)))

    def resize_pool(self, delta: int) -> bool:
        self.calls.append(("resize_pool", delta))
        return self.resizable

    def terminate(self, task_ids: Collection[str], signum: int) -> list[str]:
        self.calls.append(("terminate", (sorted(task_ids), signum)))
        running = {r.id for r in self.running}
        return [i for i in task_ids if i in running]

    def persist_revokes(self, task_ids: Collection[str]) -> None:
        self.calls.append(("persist_revokes", sorted(task_ids)))

    def shutdown(self) -> None:
        self.calls.append(("shutdown", None))

    def set_events(self, enabled: bool) -> bool:
        before, self.events_on = self.events_on, enabled
        return before

    def send_heartbeat(self) -> None:
        self.calls.append(("heartbeat", None))


@pytest.fixture
def app() -> Iterator[Taskframe]:
    app = Taskframe("panel", broker="memory://panel", backend="memory://",
                    set_as_current=False)

    @app.task(name="proj.add", rate_limit="10/m")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="celery.hidden")
    def hidden() -> None:
        return None

    yield app
    app.close()


@pytest.fixture
def state(app: Taskframe) -> RecordingState:
    return RecordingState(app)


def view(task_id: str, **kw: Any) -> RequestView:
    return RequestView(id=task_id, name="proj.add", type="proj.add", args=[1, 2],
                       kwargs={"z": 3}, hostname="w1@example",
                       delivery_info={"exchange": "", "routing_key": "celery"}, **kw)


def run(state: RecordingState, method: str, **arguments: Any) -> Any:
    typed: WorkerState = state
    return dispatch(typed, method, arguments)


def test_ping_and_unknown_method(state: RecordingState) -> None:
    assert run(state, "ping") == {"ok": "pong"}
    assert run(state, "nonexistent") == {"error": "KeyError('nonexistent')"}


def test_unknown_arguments_are_ignored(state: RecordingState) -> None:
    assert run(state, "ping", some_future_option=1) == {"ok": "pong"}


def test_active_reserved_and_safe_form(state: RecordingState) -> None:
    state.running.append(view("a", time_start=100.0, acknowledged=True, worker_pid=7))
    state.waiting.append(view("b"))
    active = run(state, "active")
    assert active == [{
        "id": "a", "name": "proj.add", "args": [1, 2], "kwargs": {"z": 3}, "type": "proj.add",
        "hostname": "w1@example", "time_start": 100.0, "acknowledged": True, "worker_pid": 7,
        "delivery_info": {"exchange": "", "routing_key": "celery", "priority": 0,
                          "redelivered": False},
    }]
    safe = run(state, "active", safe=True)
    assert safe[0]["args"] == "[1, 2]" and safe[0]["kwargs"] == "{'z': 3}"
    assert [r["id"] for r in run(state, "reserved")] == ["b"]


def test_scheduled_has_eta_priority_and_request(state: RecordingState) -> None:
    state.later.append(view("c", eta=0.0))
    [entry] = run(state, "scheduled")
    assert entry["eta"] == "1970-01-01T00:00:00+00:00"
    assert entry["priority"] == 6
    assert entry["request"]["id"] == "c"


def test_registered_hides_builtins_and_shows_attributes(state: RecordingState) -> None:
    # Only this test's tasks: shared_task()s defined by other tests join every app.
    def ours(entries: Any) -> list[str]:
        return [e for e in entries if e.startswith("proj.") or e.startswith("celery.")]

    assert ours(run(state, "registered")) == ["proj.add [rate_limit=10/m]"]
    assert ours(run(state, "registered", taskinfoitems=["name"])) == [
        "proj.add [name=proj.add]"]


def test_stats_has_the_keys_flower_reads(state: RecordingState) -> None:
    stats = run(state, "stats")
    assert {"total", "pid", "clock", "uptime", "pool", "broker", "prefetch_count",
            "rusage"} <= set(stats)
    assert stats["total"] == {"proj.add": 3}
    assert isinstance(stats["clock"], str)
    assert stats["pool"]["max-concurrency"] == 2
    assert stats["broker"]["transport"] == "memory"
    assert stats["prefetch_count"] == 8
    assert stats["health"]["status"] == "stalled"  # the watchdog's verdict


def test_active_queues_shape(state: RecordingState) -> None:
    [q] = run(state, "active_queues")
    assert q["name"] == "celery" and q["routing_key"] == "celery"
    assert q["exchange"]["name"] == "celery" and q["exchange"]["type"] == "direct"
    assert {"durable", "exclusive", "auto_delete", "no_ack", "alias", "queue_arguments",
            "binding_arguments"} <= set(q)


def test_conf_masks_passwords(state: RecordingState, app: Taskframe) -> None:
    app.conf.broker_url = "amqp://user:secret@host//"
    conf = run(state, "conf")
    assert "secret" not in str(conf)
    assert conf["broker_url"].startswith("amqp://user:")
    assert "task_serializer" in run(state, "conf", with_defaults=True)


def test_query_task(state: RecordingState) -> None:
    state.running.append(view("a"))
    state.later.append(view("c"))
    result = run(state, "query_task", ids=["a", "c", "zz"])
    assert result["a"][0] == "active" and result["c"][0] == "scheduled"
    assert "zz" not in result


def test_revoke_flags_persists_and_marks_pending_revoked(state: RecordingState,
                                                         app: Taskframe) -> None:
    app.backend.mark_as_done("done-1", 5)
    reply = run(state, "revoke", task_id=["pending-1", "done-1"])
    assert reply["ok"].endswith("flagged as revoked")
    assert "pending-1" in state.revoked and "done-1" in state.revoked
    assert ("persist_revokes", ["done-1", "pending-1"]) in state.calls
    assert app.backend.get_task_meta("pending-1")["status"] == states.REVOKED
    assert app.backend.get_task_meta("done-1")["status"] == states.SUCCESS
    assert sorted(run(state, "revoked")) == ["done-1", "pending-1"]


def test_revoke_with_terminate(state: RecordingState) -> None:
    state.running.append(view("a"))
    reply = run(state, "revoke", task_id="a", terminate=True, signal="SIGKILL")
    assert reply == {"ok": "terminate: a"}
    assert ("terminate", (["a"], int(signal.SIGKILL))) in state.calls
    assert run(state, "terminate", signal="KILL", task_id=["nope"]) == \
        {"ok": "terminate: tasks unknown"}


def test_revoke_by_stamped_headers(state: RecordingState) -> None:
    state.running.append(view("a", stamps={"tenant": "t1"}))
    reply = run(state, "revoke_by_stamped_headers", headers={"tenant": ["t1", "t2"]},
                terminate=True)
    assert reply["ok"].endswith("revoked")
    assert state.revoked.matches_stamps({"tenant": "t2"})
    assert not state.revoked.matches_stamps({"tenant": "t3"})
    assert ("terminate", (["a"], int(signal.SIGTERM))) in state.calls


def test_rate_limit_and_time_limit(state: RecordingState, app: Taskframe) -> None:
    task = app.tasks["proj.add"]
    assert run(state, "rate_limit", task_name="proj.add", rate_limit="5/s") == \
        {"ok": "new rate limit set successfully"}
    assert task.rate_limit == "5/s"
    assert ("set_rate_limit", ("proj.add", "5/s")) in state.calls
    assert run(state, "rate_limit", task_name="proj.add", rate_limit=None) == \
        {"ok": "rate limit disabled successfully"}
    assert task.rate_limit is None
    assert "error" in run(state, "rate_limit", task_name="proj.add", rate_limit="x/y")
    assert run(state, "rate_limit", task_name="nope", rate_limit=1) == {"error": "unknown task"}
    assert run(state, "time_limit", task_name="proj.add", soft=1, hard=2.5) == \
        {"ok": "time limits set successfully"}
    assert (task.soft_time_limit, task.time_limit) == (1.0, 2.5)


def test_consumers_pool_and_shutdown(state: RecordingState) -> None:
    assert run(state, "add_consumer", queue="extra") == {"ok": "add consumer extra"}
    kind, queue = state.calls[-1]
    assert kind == "add_consumer" and queue.name == "extra"
    assert run(state, "add_consumer", queue="celery") == {"ok": "already consuming from celery"}
    assert run(state, "cancel_consumer", queue="extra") == \
        {"ok": "no longer consuming from extra"}
    assert run(state, "pool_grow", n=2) == {"ok": "pool will grow"}
    assert run(state, "pool_shrink") == {"ok": "pool will shrink"}
    assert ("resize_pool", 2) in state.calls and ("resize_pool", -1) in state.calls
    state.resizable = False
    assert "error" in run(state, "pool_grow")
    assert run(state, "shutdown") is NO_REPLY
    assert ("shutdown", None) in state.calls


def test_events_heartbeat_clock_hello_report(state: RecordingState) -> None:
    assert run(state, "enable_events") == {"ok": "task events enabled"}
    assert run(state, "enable_events") == {"ok": "task events already enabled"}
    assert run(state, "disable_events") == {"ok": "task events disabled"}
    assert run(state, "disable_events") == {"ok": "task events already disabled"}
    assert run(state, "heartbeat") is None and ("heartbeat", None) in state.calls
    assert run(state, "clock") == {"clock": 41}
    reply = run(state, "hello", from_node="w2@example", revoked={"x1": 12.5})
    assert "x1" in state.revoked and reply["revoked"] == ["x1"]
    assert run(state, "hello", from_node="w1@example") is None
    assert "taskframe" in run(state, "report")["ok"]


def test_every_celery_command_is_registered() -> None:
    expected = {
        "ping", "active", "reserved", "scheduled", "revoked", "registered", "stats",
        "active_queues", "conf", "query_task", "report", "clock", "hello", "revoke",
        "revoke_by_stamped_headers", "terminate", "rate_limit", "time_limit", "add_consumer",
        "cancel_consumer", "pool_grow", "pool_shrink", "shutdown", "enable_events",
        "disable_events", "heartbeat",
    }
    assert expected <= set(HANDLERS)
    assert {n for n, h in HANDLERS.items() if h.kind == "inspect"} >= {"ping", "stats"}


def test_signal_number() -> None:
    assert signal_number(None) == signal.SIGTERM
    assert signal_number("KILL") == signal.SIGKILL == signal_number("SIGKILL")
    assert signal_number(9) == 9 and signal_number("9") == 9


# -- the mailbox end to end, on the in-process memory transport --------------------------


class NamedState(RecordingState):
    def __init__(self, app: Taskframe, hostname: str) -> None:
        super().__init__(app)
        self.hostname = hostname  # type: ignore[misc]


@pytest.fixture
def nodes(app: Taskframe) -> Iterator[list[NamedState]]:
    from taskframe.control_server.node import ControlNode

    states = [NamedState(app, "a1@example"), NamedState(app, "b1@example")]
    started = [ControlNode(app, s) for s in states]
    for node in started:
        assert node.start()
    yield states
    for node in started:
        node.stop()


def test_broadcast_reaches_the_nodes_addressed(app: Taskframe,
                                               nodes: list[NamedState]) -> None:
    control = app.control
    assert control.ping(destination=["a1@example"], timeout=10) == \
        [{"a1@example": {"ok": "pong"}}]
    both = control.ping(destination=["a1@example", "b1@example"], timeout=10)
    assert sorted(both, key=str) == [{"a1@example": {"ok": "pong"}},
                                     {"b1@example": {"ok": "pong"}}]
    by_pattern = control.broadcast("ping", reply=True, pattern="b*", matcher="glob",
                                   limit=1, timeout=10)
    assert by_pattern == [{"b1@example": {"ok": "pong"}}]
    inspect = control.inspect(destination="a1@example", timeout=10)
    clock = inspect.clock()
    assert clock is not None and isinstance(clock["a1@example"]["clock"], int)
    assert control.broadcast("nope", reply=True, destination=["b1@example"], timeout=10) == \
        [{"b1@example": {"error": "KeyError('nope')"}}]


def test_revoke_and_shutdown_over_the_mailbox(app: Taskframe, nodes: list[NamedState]) -> None:
    control = app.control
    reply = control.revoke(["t1", "t2"], destination=["a1@example"], reply=True, timeout=10)
    [[(node, answer)]] = [list(r.items()) for r in reply]
    assert node == "a1@example" and answer["ok"].endswith("flagged as revoked")
    assert "'t1'" in answer["ok"] and "'t2'" in answer["ok"]
    assert "t1" in nodes[0].revoked and "t1" not in nodes[1].revoked
    # recorded for workers that start later, in the result backend
    from taskframe.control.revoked import store_for

    store = store_for(app)
    assert store is not None and {"t1", "t2"} <= set(store.load())
    assert control.shutdown(destination=["b1@example"], reply=True, timeout=0.3) == []
    wait = time.monotonic() + 10
    while ("shutdown", None) not in nodes[1].calls and time.monotonic() < wait:
        time.sleep(0.02)
    assert ("shutdown", None) in nodes[1].calls
