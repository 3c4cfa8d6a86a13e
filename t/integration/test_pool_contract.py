"""One contract, every pool in ``taskframe.pools.POOLS``, each in a worker subprocess.

For each ``-P`` name: results and failures of sync and ``async def`` tasks, the request
seen inside a task, soft and hard time limits where the pool ``enforces_time_limits``, and
the soft-shutdown deadline: ``should_abort()`` for sync tasks, ``asyncio.CancelledError``
for ``async def`` ones. A pool added to ``POOLS`` is covered here
without touching this file. Broker and results: the shared Redis (a key prefix per test).
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import services

sys.path.insert(0, str(Path(__file__).parent / "poolproj"))
from poolfleet import PoolFleet
from workers import wait_until

from taskframe import states
from taskframe.errors import SoftTimeLimitExceeded, TimeLimitExceeded
from taskframe.pools import POOLS


def _pool_facts() -> dict[str, dict[str, object]]:
    """Class facts of every pool, asked in a subprocess: importing gevent or eventlet
    here is not wanted, and a pool whose package is missing is reported, not imported."""
    code = (
        "import json\n"
        "from taskframe.pools import POOLS\n"
        "from taskframe.errors import ImproperlyConfigured\n"
        "facts = {}\n"
        "for name in POOLS:\n"
        "    try:\n"
        "        cls = POOLS[name]\n"
        "    except ImproperlyConfigured as exc:\n"
        "        facts[name] = {'missing': str(exc)}\n"
        "    else:\n"
        "        facts[name] = {'enforces_time_limits': cls.enforces_time_limits}\n"
        "print(json.dumps(facts))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


_FACTS: dict[str, dict[str, object]] = {}


def facts(pool: str) -> dict[str, object]:
    if not _FACTS:
        _FACTS.update(_pool_facts())
    found = _FACTS[pool]
    if "missing" in found:
        services.unavailable(str(found["missing"]))
    return found


@pytest.fixture(params=sorted(POOLS))
def pool(request: pytest.FixtureRequest) -> str:
    name = str(request.param)
    facts(name)
    return name


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[PoolFleet]:
    fleet = PoolFleet(tmp_path)
    yield fleet
    fleet.close()


def test_results_failures_and_time_limits(fleet: PoolFleet, pool: str) -> None:
    fleet.start(pool, "-c", "4")
    proj = fleet.module
    limits = bool(facts(pool)["enforces_time_limits"])
    if limits:
        # A synchronous task cannot be interrupted in the asyncio pool's executor threads:
        # there the limits hold for ``async def`` tasks.
        soft_task, hard_task = (proj.asoft, proj.ahard) if pool == "asyncio" else \
            (proj.soft, proj.hard)
        soft = soft_task.apply_async((10,), soft_time_limit=0.3)
        # ...and an ``async def`` body catches SoftTimeLimitExceeded at its ``await`` on
        # every pool that enforces limits (not only on asyncio).
        async_soft = proj.asoft.apply_async((10,), soft_time_limit=0.3)
        hard = hard_task.apply_async((10,), time_limit=0.5)
        async_hard = proj.ahard.apply_async((10,), time_limit=0.5)
    who = proj.whoami.delay()
    assert proj.add.delay(2, 3).get(timeout=30) == 5
    assert proj.aadd.delay(4, 5).get(timeout=30) == 9
    assert who.get(timeout=30) == who.id  # self.request inside an async task
    failed, async_failed = proj.boom.delay(), proj.aboom.delay()
    with pytest.raises(ValueError, match="boom"):
        failed.get(timeout=30)
    with pytest.raises(KeyError):
        async_failed.get(timeout=30)
    assert failed.state == async_failed.state == states.FAILURE
    assert failed.traceback and "ValueError" in failed.traceback
    if not limits:
        return
    assert soft.get(timeout=30) == "soft", "SoftTimeLimitExceeded is raised inside the task"
    assert async_soft.get(timeout=30) == "soft", "...and inside an async def task"
    for result in (hard, async_hard):
        with pytest.raises(TimeLimitExceeded):
            result.get(timeout=30)
        assert result.state == states.FAILURE


def test_a_body_exit_fails_its_task_and_the_pool_goes_on(fleet: PoolFleet, pool: str) -> None:
    """SystemExit, KeyboardInterrupt, an async body's own CancelledError: FAILURE stored,
    the slot freed (one slot here: the tasks after them run), the worker exits 0."""
    proc = fleet.start(pool, "-c", "1")
    proj = fleet.module
    exits = [proj.exits.delay("SystemExit"), proj.exits.delay("KeyboardInterrupt"),
             proj.acancelled.delay()]
    assert proj.add.delay(2, 3).get(timeout=30) == 5
    for result, kind in zip(exits, ("SystemExit", "KeyboardInterrupt", "CancelledError"),
                            strict=True):
        with pytest.raises(BaseException) as info:
            result.get(timeout=30)
        assert type(info.value).__name__ == kind, fleet.log_text()
        assert result.state == states.FAILURE
    proc.terminate()
    assert proc.wait(30) == 0, fleet.log_text()


#: Revokes racing a freeing slot, per pool.
RACE_TRIES = 30


def test_a_revoke_landing_as_the_slot_frees_is_honoured(fleet: PoolFleet, pool: str) -> None:
    """One slot; each try's victim waits in the pool (held ahead of the slot where the pool
    does that) while the running task revokes it and returns the moment the worker
    confirmed. The slot takes the victim next, microseconds later: it must see the revoke
    (the consumer loop's own re-check, one turn away, is too late)."""
    proc = fleet.start(pool, "-c", "1", "--prefetch-multiplier", "2")
    proj = fleet.module
    victims = []
    for n in range(RACE_TRIES):
        victim_id = str(uuid.uuid4())
        first = proj.revoke_next.apply_async((victim_id, 0.15))
        victims.append(proj.nap.apply_async((n, 0.0), task_id=victim_id))
        assert first.get(timeout=30) == victim_id, fleet.log_text()
    assert proj.add.delay(2, 3).get(timeout=30) == 5  # one slot: every victim went first
    started = [line for line in fleet.lines() if line.startswith(("start", "unconfirmed"))]
    assert started == [], f"{len(started)} of {RACE_TRIES} revoked tasks ran: {started}"
    wait_until(lambda: all(v.state == states.REVOKED for v in victims), 30,
               "every victim to be REVOKED")
    proc.terminate()
    assert proc.wait(30) == 0, fleet.log_text()
    assert "Exception in thread" not in fleet.log_text()


def test_should_abort_at_the_shutdown_deadline(fleet: PoolFleet, pool: str) -> None:
    proc = fleet.start(pool, "-c", "2", "--soft-shutdown-timeout", "0.5")
    result = fleet.module.wait_abort.delay(30)
    wait_until(lambda: any(line.startswith("started") for line in fleet.lines()), 30,
               "the task to start")
    proc.terminate()
    assert proc.wait(30) == 0, fleet.log_text()
    assert "aborted shutdown" in fleet.lines(), fleet.log_text()
    assert result.get(timeout=10) == "shutdown"


def test_async_task_is_cancelled_at_the_shutdown_deadline(fleet: PoolFleet, pool: str) -> None:
    proc = fleet.start(pool, "-c", "2", "--soft-shutdown-timeout", "0.5")
    result = fleet.module.await_cancel.delay(30)
    wait_until(lambda: any(line.startswith("started") for line in fleet.lines()), 30,
               "the task to start")
    proc.terminate()
    assert proc.wait(30) == 0, fleet.log_text()
    # should_abort() is true and the coroutine sees CancelledError; it did not finish, so
    # nothing is stored and its message (acks_late) went back to the broker.
    assert "cancelled True shutdown" in fleet.lines(), fleet.log_text()
    assert result.state == states.PENDING


def test_pools_can_be_named_without_importing_them() -> None:
    """gevent and eventlet are imported only when their pool is looked up (monkey-patching
    must come first)."""
    code = ("import sys\nfrom taskframe.pools import POOLS\n"
            "names = sorted(POOLS)\n"
            "print(names, 'gevent' in sys.modules, 'eventlet' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    names = sorted(POOLS)
    assert out.stdout.strip() == f"{names} False False"
    assert {"solo", "threads", "gevent", "eventlet", "asyncio"} <= set(names)


def test_async_soft_limit_not_caught_fails_the_task(fleet: PoolFleet) -> None:
    """An ``async def`` body that does not catch the soft limit fails with
    SoftTimeLimitExceeded (gevent shown: the greenlet passes it on to the coroutine)."""
    facts("gevent")  # skips (or fails under TASKFRAME_REQUIRE_SERVICES=1) without gevent
    fleet.start("gevent", "-c", "2")
    result = fleet.module.asoft_uncaught.apply_async((10,), soft_time_limit=0.3)
    with pytest.raises(SoftTimeLimitExceeded):
        result.get(timeout=30)
