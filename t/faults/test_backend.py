"""The result store goes down while hard time limits fire, expired tasks and chord parts
arrive.

Prefork -c 2 on RabbitMQ; the result backend is a redis-server of the test's own
behind a fault proxy that resets every connection (the store looks down). Two tasks
overrun a 1 s hard time limit (the supervisor kills their children and must store
``TimeLimitExceeded``) and two arrive already expired (the consumer must store
REVOKED): each write fails. The worker must go on (issue 14, Why 1 and 3): the tasks
sent while the store is down and after it is back all run, the expired ones never do,
and the worker exits 0 with no unhandled exception in its log. Chord parts that end
while the store is down cannot store their results nor count themselves: they run once
each, their failures to store are logged, and the worker goes on.
"""

from __future__ import annotations

import datetime
import time

from faults.harness import Run
from faults.proxy import FaultProxy
from faults.scenarios import Scenarios, shared_broker
from faults.servers import RedisNode

from taskframe.canvas import chord, signature


def _more_work_then_heal(run: Run, proxy: FaultProxy) -> None:
    """Tasks sent while the store is down, then after it is back: all run; then count."""
    run.send(10, 0.05)
    run.wait_ended(60)  # the store is still down
    proxy.heal()
    run.send(10, 0.05)
    run.wait_ended(60)
    tally = run.tally()
    tally.notes.append(f"store: {proxy.resets} connection(s) refused")
    assert proxy.resets > 0, "the worker never tried the result store"


def test_backend_down_during_time_limits_and_expiries(redis_node: RedisNode,
                                                      faults: Scenarios) -> None:
    broker = shared_broker("amqp")
    with FaultProxy(redis_node.port) as proxy:
        conf = {"result_backend": proxy.url("redis", "/0")}
        for run in faults.runs(broker, conf=conf, before=lambda _: proxy.heal()):
            run.start_worker("-P", "prefork", "-c", "2")
            proxy.refuse()
            past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=5)
            client = run.client
            limited = [client.send_task("fproj.work", (30.0,), time_limit=1.0,
                                        ignore_result=False).id for _ in range(2)]
            run.forbid(client.send_task("fproj.work", (0.0,), expires=past,
                                        ignore_result=False).id for _ in range(2))
            run.wait_until_started(limited, 30)
            time.sleep(2.0)  # both hard limits fire; storing their failure fails
            _more_work_then_heal(run, proxy)


def test_backend_down_during_chord_parts(redis_node: RedisNode, faults: Scenarios) -> None:
    broker = shared_broker("redis")
    with FaultProxy(redis_node.port) as proxy:
        conf = {"result_backend": proxy.url("redis", "/0")}
        for run in faults.runs(broker, conf=conf, before=lambda _: proxy.heal()):
            run.start_worker("-P", "threads", "-c", "4")
            client = run.client
            parts = [signature("fproj.work", (1.5,), app=client, ignore_result=False)
                     for _ in range(4)]
            ids = [part.freeze().id for part in parts]
            body = signature("fproj.work", (0.0,), app=client, ignore_result=False)
            chord(parts, body).apply_async()  # the store is up: the chord is set up
            run.sent.extend(ids)
            run.wait_until_started(ids, 30)
            proxy.refuse()  # every part ends, and fails to store, while the store is down
            run.wait_ended(60)
            _more_work_then_heal(run, proxy)
