"""Bodies that raise a BaseException of their own, on every pool, under a draining worker.

``SystemExit``, ``KeyboardInterrupt``, and an ``async def`` body whose own helper was
cancelled (``CancelledError``), with late acks and one message prefetched per slot: the
slot must be freed and the message settled once (before issue 14, Why 2, the slot leaked,
a solo worker never polled again and never finished a warm shutdown; the asyncio pool
requeued its task's own CancelledError forever). The tasks sent after them all run, none
runs twice, and the worker stops with exit status 0.
"""

from __future__ import annotations

import pytest
from faults.scenarios import Scenarios, shared_broker

POOLS = {"solo": ("-P", "solo"), "threads": ("-P", "threads", "-c", "2"),
         "prefork": ("-P", "prefork", "-c", "2"), "gevent": ("-P", "gevent", "-c", "4"),
         "eventlet": ("-P", "eventlet", "-c", "4"), "asyncio": ("-P", "asyncio", "-c", "4")}


@pytest.mark.parametrize("pool", list(POOLS))
def test_base_exception_bodies(faults: Scenarios, pool: str) -> None:
    broker = shared_broker("redis")
    for run in faults.runs(broker, conf={"task_acks_late": True,
                                         "worker_prefetch_multiplier": 1}):
        client = run.client
        run.sent.extend([
            client.send_task("fproj.escape", ("SystemExit",), ignore_result=True).id,
            client.send_task("fproj.escape", ("KeyboardInterrupt",), ignore_result=True).id,
            client.send_task("fproj.cancelled", ignore_result=True).id])
        run.send(10, 0.01)
        run.start_worker(*POOLS[pool])
        run.wait_ended(60)
