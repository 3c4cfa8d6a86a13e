"""Redis answers no client for longer than the worker's socket timeout, tasks running.

A redis-server of the test's own; ``socket_timeout`` 2 s; four 8 s acks_late tasks
running on threads -c 4 when ``CLIENT PAUSE ... ALL`` starts. The worker sees its
link time out and reconnects while its tasks still run: a delivery on Redis belongs
to the worker, not to the socket (issue 14), so each task runs once.

Two pauses, as the worker's recovery meets the server in two states: 3 s ends while
the worker is giving back what it held after the timeout (its give-back reaches
Redis), 5 s outlasts that too (the give-back fails; the messages stay held).
"""

from __future__ import annotations

import time

import pytest
from faults.harness import Broker
from faults.scenarios import Scenarios
from faults.servers import RedisNode


@pytest.mark.parametrize("pause", [3.0, 5.0])
def test_redis_client_pause(redis_node: RedisNode, faults: Scenarios, pause: float) -> None:
    broker = Broker("redis", redis_node.url)
    conf = {"task_acks_late": True, "broker_transport_options": {"socket_timeout": 2.0}}
    for run in faults.runs(broker, conf=conf):
        run.send(4, 8.0)
        run.start_worker("-P", "threads", "-c", "4")
        run.wait_started(4, 30)
        redis_node.pause_clients(pause)
        time.sleep(pause)
        run.wait_ended(60)
        time.sleep(2.0)  # a second run of a task given back would have started by now
