"""The broker restarted under load: a worker (threads -c 4) draining 1,000 tasks.

Redis: a redis-server of the test's own (append-only file, fsync always) is killed
(SIGKILL: a crash; every acknowledged write is on disk) when 200 tasks have ended,
and started again two seconds later on the same port and directory. RabbitMQ: a node
of the suite's own is stopped (``stop_app``) and started (``start_app``) likewise.
The transports' defaults are kept (on Redis a visibility timeout of an hour): a
worker that reconnects must carry on with the work it held, not wait for a timeout.

Duplicates: early acks promise at most once. With late acks, a task that ended while
the broker was down could not be acked: on RabbitMQ the broker gives it out again (at
least once, counted); on Redis the delivery stays the worker's and its ack is written
after reconnecting (issue 14), so none.
"""

from __future__ import annotations

import time

import pytest
from faults.harness import Broker
from faults.scenarios import Scenarios
from faults.servers import RabbitNode, RedisNode

TASKS = 1000
DOWN = 2.0


@pytest.mark.parametrize("acks", ["early", "late"])
def test_redis_restart(redis_node: RedisNode, faults: Scenarios, acks: str) -> None:
    broker = Broker("redis", redis_node.url)
    for run in faults.runs(broker, conf={"task_acks_late": acks == "late"}):
        run.send(TASKS)
        run.start_worker("-P", "threads", "-c", "4")
        run.wait_ended(120, count=200)
        redis_node.stop(kill=True)
        time.sleep(DOWN)
        redis_node.start()
        run.wait_ended(120)
        time.sleep(1.0)


@pytest.mark.parametrize("acks", ["early", "late"])
def test_rabbitmq_restart(rabbit_node: RabbitNode, faults: Scenarios, acks: str) -> None:
    broker = Broker("amqp", rabbit_node.url)
    for run in faults.runs(broker, conf={"task_acks_late": acks == "late"},
                           duplicates_allowed=acks == "late"):
        run.send(TASKS)
        run.start_worker("-P", "threads", "-c", "4")
        run.wait_ended(120, count=200)
        rabbit_node.stop_app()
        time.sleep(DOWN)
        rabbit_node.start_app()
        run.wait_ended(120)
        time.sleep(1.0)
