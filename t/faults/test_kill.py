"""``kill -9`` of a worker, and of a prefork child, with tasks running and queued.

A worker: a second worker must finish the work. Redis learns of a dead consumer
only through the visibility timeout (3 s here); RabbitMQ at once.
A prefork child: its worker replaces it and finishes the work itself.

What the semantics allow: with early acks a task whose process died is not run again
(at most once: counted as interrupted, never as lost, and no duplicate); with late
acks it runs again (duplicates counted), except a prefork child's task without
``task_reject_on_worker_lost``: that one fails with WorkerLostError (interrupted).
Every task that did not start in the killed process must end, exactly once.
"""

from __future__ import annotations

import signal
import time

import pytest
from faults.harness import descendants_of
from faults.scenarios import Scenarios, shared_broker
from workers import expect, wait_until

POOLS = {"threads": ("-P", "threads", "-c", "4"), "prefork": ("-P", "prefork", "-c", "2"),
         "solo": ("-P", "solo")}
# solo: early acks only (its slot writes them itself; its late acks go as on threads).
ACKS_POOLS = [("early", "threads"), ("early", "prefork"), ("late", "threads"),
              ("late", "prefork"), ("early", "solo")]
SLOTS = {"threads": 4, "prefork": 2, "solo": 1}
TASKS = 24
SECONDS = 0.3
VISIBILITY = 3.0


def conf_for(kind: str, acks_late: bool, reject_on_worker_lost: bool) -> dict[str, object]:
    conf: dict[str, object] = {"task_acks_late": acks_late,
                               "task_reject_on_worker_lost": reject_on_worker_lost}
    if kind == "redis":
        # A worker killed while it holds kombu's restore mutex would stop every restore
        # for the mutex's life (300 s by default): not what these scenarios measure.
        conf["broker_transport_options"] = {"visibility_timeout": VISIBILITY,
                                            "unacked_mutex_expire": 2.0}
    return conf


def _late_duplicates_window(kind: str) -> float:
    """How long a wrong second run takes to show: Redis restores after the visibility timeout."""
    return VISIBILITY + 2.0 if kind == "redis" else 1.0


@pytest.mark.parametrize(("acks", "pool"), ACKS_POOLS, ids=["-".join(p) for p in ACKS_POOLS])
@pytest.mark.parametrize("kind", ["redis", "amqp"])
def test_kill_worker(faults: Scenarios, kind: str, acks: str, pool: str) -> None:
    broker = shared_broker(kind)
    late = acks == "late"
    for run in faults.runs(broker, conf=conf_for(kind, late, False), duplicates_allowed=late):
        run.send(TASKS, SECONDS)
        victim = run.start_worker(*POOLS[pool])
        # Every slot runs a task: none is between its early ack and its body's first line,
        # where a kill loses it unseen (at most once allows it; the store cannot tell).
        run.wait_started(SLOTS[pool], 60, poll=0.005)
        family = [victim.pid, *descendants_of(victim.pid)]
        run.kill(victim.pid)
        victim.wait()
        run.killed.update(family)  # a child may be cut short by its worker's death too
        run.wait_exited(family, 30)  # a pool child outliving its worker would still consume
        run.start_worker(*POOLS[pool])
        run.wait_ended(90, at_most_once=not late)
        time.sleep(_late_duplicates_window(kind))
        run.tally(at_most_once=not late)


@pytest.mark.parametrize("mode", ["early", "late-reject", "late-noreject"])
@pytest.mark.parametrize("kind", ["redis", "amqp"])
def test_kill_prefork_child(faults: Scenarios, kind: str, mode: str) -> None:
    broker = shared_broker(kind)
    late, rowl = mode.startswith("late"), mode == "late-reject"
    for run in faults.runs(broker, conf=conf_for(kind, late, rowl),
                           duplicates_allowed=late and rowl):
        run.send(TASKS, SECONDS)
        worker = run.start_worker("-P", "prefork", "-c", "2")
        run.wait_started(2, 60)
        child = run.wait_running_child(worker.pid, 30)
        run.kill(child)
        run.wait_ended(90, at_most_once=not (late and rowl))
        time.sleep(_late_duplicates_window(kind))
        run.tally(at_most_once=not (late and rowl))


@pytest.mark.parametrize("pool", ["threads", "prefork", "solo"])
@pytest.mark.parametrize("kind", ["redis", "amqp"])
def test_kill_at_the_start_of_an_early_ack_body(faults: Scenarios, kind: str,
                                                 pool: str) -> None:
    """The process dies at the body's first instruction (``fproj.die_at_start``).

    No race to win: the early ack must be on the wire before the body starts, so the
    task is never given out again. A second worker (threads, solo: its slot writes the
    ack) or the worker's new child (prefork) runs the tasks sent next, and no second start
    of the doomed one.
    """
    broker = shared_broker(kind)
    for run in faults.runs(broker, conf=conf_for(kind, False, False)):
        doomed = run.client.send_task("fproj.die_at_start", ignore_result=True).id
        run.sent.append(doomed)
        in_process = pool != "prefork"  # the task kills the worker itself
        first = run.start_worker(*POOLS[pool], wait=not in_process)
        if in_process:
            expect(first, exit_codes={-signal.SIGKILL}, why="its task kills its process")
        run.wait_until_started([doomed], 60)
        # The body writes "start" then "doomed" (with its pid) before it dies: wait for the
        # second, or a read in between misses the pid and counts the start as lost.
        wait_until(lambda run=run: any(k == "doomed" for k, _, _ in run.records()), 60,
                   "the doomed task to name its process")
        run.killed.update(pid for kind_, _, pid in run.records() if kind_ == "doomed")
        if in_process:
            first.wait(30)
            run.start_worker(*POOLS[pool])
        run.send(8, 0.05)
        run.wait_ended(60, at_most_once=True)
        time.sleep(_late_duplicates_window(kind))
        run.tally(at_most_once=True)
