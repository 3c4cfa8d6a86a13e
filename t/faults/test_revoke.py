"""A revoke sent while the worker's link to the broker (control included) is down.

The worker reaches the broker through a fault proxy; the result backend (where every
revoke is also recorded, for workers that were not listening) is a redis-server of
the test's own, reached directly. A task is sent with a 6 s countdown, the proxy
resets every link and refuses new ones, the client revokes the task (the broadcast
reaches no worker; the record does), and the link heals. When the countdown is due
the worker must not run the task (issue 14, Why 5: a revoke sent while the control
link is down must be caught up), and the other tasks all run.
"""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import pytest
from faults.proxy import FaultProxy
from faults.scenarios import Scenarios, shared_broker
from faults.servers import RedisNode

COUNTDOWN = 6.0


@pytest.mark.parametrize("kind", ["redis", "amqp"])
def test_revoke_while_the_control_link_is_down(redis_node: RedisNode, faults: Scenarios,
                                               kind: str) -> None:
    broker = shared_broker(kind)
    port = urlsplit(broker.url).port
    assert port is not None
    with FaultProxy(port) as proxy:
        worker_url = proxy.url(kind, "//" if kind == "amqp" else "/0").replace(
            "amqp://", "amqp://guest:guest@")
        conf = {"result_backend": redis_node.url, "broker_heartbeat": 2.0,
                "broker_transport_options": {"socket_timeout": 2.0}}
        for run in faults.runs(broker, worker_url=worker_url, conf=conf,
                               before=lambda _: proxy.heal()):
            run.start_worker("-P", "threads", "-c", "2")
            sent_at = time.monotonic()
            target = run.client.send_task("fproj.work", (0.0,), countdown=COUNTDOWN,
                                          ignore_result=True).id
            run.forbid([target])
            proxy.refuse()
            run.client.control.revoke(target)
            time.sleep(2.0)
            proxy.heal()
            run.send(5, 0.05)
            run.wait_ended(60)
            time.sleep(max(0.0, sent_at + COUNTDOWN + 3.0 - time.monotonic()))
            run.send(5, 0.05)  # sent after the due time: the target was taken by now
            run.wait_ended(60)
