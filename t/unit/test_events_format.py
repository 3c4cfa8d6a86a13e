"""The event format (fields, routing keys, clock, timestamps) and the monitor's lines."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from click.testing import CliRunner

from taskframe.cli.main import main
from taskframe.events import (
    TASK_EVENT_STATES,
    EventDispatcher,
    EventFormatter,
    EventReceiver,
    LamportClock,
    event_exchange,
    make_event,
    routing_key_for,
)
from taskframe.events.event import adjust_timestamp, group_of, load_average, utcoffset
from taskframe.transport import Connection


def test_make_event_has_celery_common_fields() -> None:
    event = make_event("task-succeeded", hostname="w1@h", clock=7, uuid="abc", result="5",
                       runtime=0.5)
    assert event["type"] == "task-succeeded"
    assert event["hostname"] == "w1@h"
    assert event["clock"] == 7
    assert event["pid"] == os.getpid()
    assert isinstance(event["timestamp"], float)
    assert event["utcoffset"] == utcoffset()
    assert (event["uuid"], event["result"], event["runtime"]) == ("abc", "5", 0.5)
    json.dumps(event)  # JSON-serializable as sent


def test_routing_keys_and_groups() -> None:
    assert routing_key_for("worker-heartbeat") == "worker.heartbeat"
    assert routing_key_for("task-succeeded") == "task.succeeded"
    assert group_of("task-succeeded") == "task"
    assert group_of("worker-online") == "worker"
    assert TASK_EVENT_STATES["task-received"] == "RECEIVED"
    assert TASK_EVENT_STATES["task-rejected"] == "REJECTED"


def test_exchange_is_topic_on_amqp_and_fanout_on_redis() -> None:
    amqp = event_exchange("amqp://guest:guest@localhost//")
    assert (amqp.name, amqp.type, amqp.durable) == ("celeryev", "topic", True)
    assert event_exchange("redis://localhost:6379/0", "myev").type == "fanout"
    assert event_exchange("redis://localhost:6379/0", "myev").name == "myev"


def test_lamport_clock_moves_past_what_it_sees() -> None:
    clock = LamportClock()
    assert clock.forward() == 1
    assert clock.adjust(10) == 11
    assert clock.adjust(3) == 12
    assert clock.forward() == 13


def test_adjust_timestamp_uses_the_senders_offset() -> None:
    here = utcoffset()
    assert adjust_timestamp(1000.0, here) == 1000.0
    # A sender one hour further west stamped its local clock one hour behind ours.
    assert adjust_timestamp(1000.0, here + 1) == 1000.0 - 3600


def test_load_average_is_three_rounded_floats() -> None:
    loads = load_average()
    assert len(loads) == 3
    assert all(round(v, 2) == v for v in loads)


def test_batches_merge_runs_of_task_events() -> None:
    dispatcher = EventDispatcher(Connection("redis://127.0.0.1:6379/0"), "w@h",
                                 buffer_limit=2)
    events = [make_event(t, hostname="w@h", clock=i) for i, t in enumerate(
        ["task-received", "task-started", "task-succeeded", "worker-heartbeat",
         "task-received"])]
    batches = dispatcher._batches([(routing_key_for(e["type"]), e) for e in events])
    assert [key for key, _ in batches] == [
        "task.multi", "task.succeeded", "worker.heartbeat", "task.received"]
    assert [e["type"] for e in batches[0][1]] == ["task-received", "task-started"]
    dispatcher.close()


def test_receiver_localizes_events() -> None:
    receiver = EventReceiver(Connection("redis://127.0.0.1:6379/0"))
    assert receiver.queue.name.startswith("celeryev.")
    assert receiver.queue.arguments == {"x-message-ttl": 5000, "x-expires": 60000}
    assert receiver.queue.auto_delete and receiver.queue.exclusive
    worker_event = receiver.localize({"type": "worker-online", "clock": 41, "timestamp": 5.0,
                                      "utcoffset": utcoffset()}, now=9.0)
    assert worker_event["timestamp"] == 5.0
    assert worker_event["local_received"] == 9.0
    assert receiver.clock.value == 42
    sent = receiver.localize({"type": "task-sent", "clock": 1000})
    assert sent["clock"] == 41  # clients' clocks never sync: ours, minus one


def test_formatter_lines_name_the_task_from_earlier_events() -> None:
    fmt = EventFormatter()
    now = time.time()
    received = fmt({"type": "task-received", "hostname": "w1@h", "timestamp": now,
                    "uuid": "id-1", "name": "proj.add", "args": "(2, 3)", "retries": 0})
    assert " w1@h task-received proj.add[id-1] RECEIVED args=(2, 3)" in received
    assert "retries" not in received
    done = fmt({"type": "task-succeeded", "hostname": "w1@h", "timestamp": now,
                "uuid": "id-1", "result": "5", "runtime": 0.25})
    assert done.endswith("w1@h task-succeeded proj.add[id-1] SUCCESS runtime=0.250s result=5")
    beat = fmt({"type": "worker-heartbeat", "hostname": "w1@h", "timestamp": now,
                "active": 1, "processed": 2, "freq": 2.0, "loadavg": [0.5, 0.1, 0.0]})
    assert "worker-heartbeat active=1 processed=2 freq=2.0 loadavg=0.5,0.1,0.0" in beat


def test_formatter_json_lines() -> None:
    line = EventFormatter(as_json=True)({"type": "task-started", "uuid": "x", "clock": 3})
    assert json.loads(line) == {"type": "task-started", "uuid": "x", "clock": 3}


def test_worker_command_has_event_and_health_options() -> None:
    result = CliRunner().invoke(main, ["worker", "--help"])
    assert result.exit_code == 0
    for option in ("--task-events", "--heartbeat-interval", "--without-heartbeat",
                   "--health-file", "--health-port", "--health-timeout", "--watchdog"):
        assert option in result.output
    result = CliRunner().invoke(main, ["events", "--help"])
    assert result.exit_code == 0 and "--json" in result.output


def test_events_command_refuses_brokers_without_events(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["-b", f"sqlite:///{tmp_path}/b.sqlite3", "events",
                                       "--timeout", "1"])
    assert result.exit_code == 69
    assert "AMQP and Redis" in result.output
