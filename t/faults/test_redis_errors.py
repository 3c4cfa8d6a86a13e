"""Redis refuses commands for a while with an error that is not a lost connection.

A redis-server of the test's own turns read-only (``REPLICAOF`` a port where no master
listens: it keeps its data and answers writes with ``READONLY``, as a demoted primary
does after a failover) or full (``maxmemory`` 1 byte, ``noeviction``: ``OOM``) for
three seconds under a worker draining late-ack tasks; or it restarts and answers every
command with ``LOADING`` while it reads its data back (slowed down with Redis's own
``key-load-delay``, so the window lasts seconds). The worker must not exit: it waits and
goes on (issue 14, Why 3), and nothing is lost or run twice.
"""

from __future__ import annotations

import time

import pytest
from faults.harness import Broker
from faults.scenarios import Scenarios
from faults.servers import RedisNode, spare_port

OUTAGE = 3.0
#: Keys of filler data and the microseconds Redis waits after loading each: a LOADING
#: window of about two seconds.
FILLER_KEYS, LOAD_DELAY_US = 2000, 1000


def _refuse_writes(node: RedisNode, how: str) -> None:
    client = node.client()
    try:
        if how == "readonly":
            client.execute_command("REPLICAOF", "127.0.0.1", spare_port())
        else:
            client.config_set("maxmemory-policy", "noeviction")
            client.config_set("maxmemory", 1)
    finally:
        client.close()


def _accept_writes(node: RedisNode, how: str) -> None:
    client = node.client()
    try:
        if how == "readonly":
            client.execute_command("REPLICAOF", "NO", "ONE")
        else:
            client.config_set("maxmemory", 0)
    finally:
        client.close()


@pytest.mark.parametrize("how", ["readonly", "oom"])
def test_redis_refuses_writes(redis_node: RedisNode, faults: Scenarios, how: str) -> None:
    broker = Broker("redis", redis_node.url)
    for run in faults.runs(broker, conf={"task_acks_late": True}):
        run.send(60, 0.1)
        run.start_worker("-P", "threads", "-c", "4")
        run.wait_started(10, 60)
        _refuse_writes(redis_node, how)
        time.sleep(OUTAGE)
        _accept_writes(redis_node, how)
        run.wait_ended(60)
        time.sleep(1.0)


def _fill_and_rewrite(node: RedisNode) -> None:
    """Filler keys, then an AOF rewrite: at start Redis loads them from the RDB base file,
    where ``key-load-delay`` applies."""
    client = node.client()
    try:
        pipe = client.pipeline(transaction=False)
        for n in range(FILLER_KEYS):
            pipe.set(f"filler:{n}", "x" * 64)
        pipe.execute()
        client.bgrewriteaof()
        deadline = time.monotonic() + 30
        while client.info("persistence")["aof_rewrite_in_progress"]:
            assert time.monotonic() < deadline, "the AOF rewrite did not end"
            time.sleep(0.05)
    finally:
        client.close()


@pytest.mark.parametrize("acks", ["early", "late"])
def test_redis_loading(redis_node: RedisNode, faults: Scenarios, acks: str) -> None:
    """A restart whose load takes seconds: every command meets ``LOADING`` meanwhile."""
    broker = Broker("redis", redis_node.url)
    for run in faults.runs(broker, conf={"task_acks_late": acks == "late"}):
        _fill_and_rewrite(redis_node)
        run.send(60, 0.1)
        run.start_worker("-P", "threads", "-c", "4")
        run.wait_started(10, 60)
        redis_node.stop(kill=False)  # SHUTDOWN NOSAVE: the AOF holds every write
        began = time.monotonic()
        redis_node.start("--key-load-delay", str(LOAD_DELAY_US))  # returns once loaded
        loading = time.monotonic() - began
        assert loading > 1.0, f"Redis loaded in {loading:.2f} s: no LOADING window to test"
        run.wait_ended(60)
        time.sleep(1.0)
