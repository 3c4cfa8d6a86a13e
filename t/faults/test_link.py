"""The link between worker and broker cut or black-holed while tasks run.

The worker reaches the shared broker through a fault proxy; the client publishes
straight to it. With tasks running and more queued, the proxy either resets every
connection (``cut``) or swallows every byte for longer than the worker's timeouts
(``blackhole``: Redis ``socket_timeout`` 2 s, AMQP heartbeat 2 s) and then heals.

Duplicates: on RabbitMQ a late-ack task whose channel died before its ack is given to
a consumer again: the broker's semantics (at least once), so they are counted, not
failed. On Redis a delivery belongs to the worker across reconnects (issue 14), and
early acks promise at most once on both: no duplicate there.
"""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import pytest
from faults.proxy import FaultProxy
from faults.scenarios import Scenarios, shared_broker

TASKS = 60
SECONDS = 0.1
POOLS = {"threads": ("-P", "threads", "-c", "4"), "prefork": ("-P", "prefork", "-c", "2"),
         "solo": ("-P", "solo")}
# solo: early acks only (its slot writes them itself; its late acks go as on threads).
ACKS_POOLS = [("early", "threads"), ("early", "prefork"), ("late", "threads"),
              ("late", "prefork"), ("early", "solo")]


def conf_for(kind: str, acks_late: bool) -> dict[str, object]:
    """Short timeouts so a dead link is noticed within seconds."""
    if kind == "redis":
        return {"task_acks_late": acks_late,
                "broker_transport_options": {"socket_timeout": 2.0}}
    return {"task_acks_late": acks_late, "broker_heartbeat": 2.0}


@pytest.mark.parametrize(("acks", "pool"), ACKS_POOLS, ids=["-".join(p) for p in ACKS_POOLS])
@pytest.mark.parametrize("kind", ["redis", "amqp"])
@pytest.mark.parametrize("fault", ["cut", "blackhole"])
def test_link(faults: Scenarios, fault: str, kind: str, acks: str, pool: str) -> None:
    broker = shared_broker(kind)
    acks_late = acks == "late"
    port = urlsplit(broker.url).port
    assert port is not None
    with FaultProxy(port) as proxy:
        worker_url = proxy.url(kind, "//" if kind == "amqp" else "/0").replace(
            "amqp://", "amqp://guest:guest@")
        for run in faults.runs(broker, worker_url=worker_url, conf=conf_for(kind, acks_late),
                               duplicates_allowed=kind == "amqp" and acks_late,
                               before=lambda _: proxy.heal()):
            run.send(TASKS, SECONDS)
            run.start_worker(*POOLS[pool])
            run.wait_started(10, 60)
            if fault == "cut":
                proxy.cut()
            else:
                proxy.blackhole()
                time.sleep(5.0)  # past the 2 s timeouts: the worker must notice
                proxy.heal()
            run.wait_ended(60)
            time.sleep(1.0)  # a late duplicate lands now
            tally = run.tally()
            assert proxy.accepted > 1, "the worker never went through the proxy"
            tally.notes.append(f"proxy: {proxy.accepted} connection(s), {proxy.resets} reset")
