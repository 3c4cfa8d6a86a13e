"""Warm shutdown with work queued ahead: SIGTERM mid-drain, then a second worker.

The first worker holds prefetched messages beyond its running tasks when it gets
SIGTERM: it must finish what runs, give back what it holds, and exit 0. A second
worker then runs the rest: nothing lost, nothing run twice, whatever the ack mode
(a warm shutdown is no crash).
"""

from __future__ import annotations

import signal
import time

import pytest
from faults.scenarios import Scenarios, shared_broker

TASKS = 24
SECONDS = 0.25
POOLS = {"threads": ("-P", "threads", "-c", "4"), "prefork": ("-P", "prefork", "-c", "2"),
         "solo": ("-P", "solo")}
# solo: early acks only (the next task waits in its pool unacked; its slot writes the ack).
POOL_ACKS = [("threads", "early"), ("threads", "late"), ("prefork", "early"),
             ("prefork", "late"), ("solo", "early")]


@pytest.mark.parametrize(("pool", "acks"), POOL_ACKS, ids=["-".join(p) for p in POOL_ACKS])
@pytest.mark.parametrize("kind", ["redis", "amqp"])
def test_warm_shutdown_with_work_queued_ahead(faults: Scenarios, kind: str, pool: str,
                                              acks: str) -> None:
    broker = shared_broker(kind)
    for run in faults.runs(broker, conf={"task_acks_late": acks == "late"}):
        run.send(TASKS, SECONDS)
        first = run.start_worker(*POOLS[pool])
        run.wait_started(6, 60)
        first.send_signal(signal.SIGTERM)
        first.wait(60)
        held = run.started()
        run.start_worker(*POOLS[pool])
        run.wait_ended(60)
        time.sleep(1.0)
        tally = run.tally()
        tally.notes.append(f"{held} started before the second worker")
