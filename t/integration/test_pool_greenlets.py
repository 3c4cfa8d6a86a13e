"""The gevent and eventlet pools, in worker subprocesses (monkey-patching never leaks here).

Each test starts ``taskframe -A poolproj worker -P gevent|eventlet`` (the CLI patches before it
imports anything) on the shared Redis, or drives a pool directly in a patched subprocess.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import services

sys.path.insert(0, str(Path(__file__).parent / "poolproj"))
from poolfleet import PROJ_DIR, PoolFleet, max_overlap

from taskframe import states


def _require(pool: str) -> None:
    """The pool's library, found without importing it here (it would patch nothing, but
    gevent and eventlet stay out of this process): skip loudly, or fail, without it."""
    if importlib.util.find_spec(pool) is None:
        services.unavailable(f"!!! {pool} is NOT installed; its pool tests are skipped. "
                             f"Install it, or set {services.REQUIRE_ENV}=1 to fail instead.")

GREEN_POOLS = ["gevent", "eventlet"]


@pytest.fixture
def fleet(tmp_path: Path, pool: str) -> Iterator[PoolFleet]:
    _require(pool)
    fleet = PoolFleet(tmp_path)
    yield fleet
    fleet.close()


@pytest.mark.parametrize("pool", GREEN_POOLS)
def test_100_sleeping_tasks_run_at_once(fleet: PoolFleet, pool: str) -> None:
    """-c 100: the consumer (main greenlet) yields while it waits, so the naps overlap."""
    fleet.start(pool, "-c", "100")
    results = [fleet.module.nap.delay(n, 0.2) for n in range(100)]
    assert sorted(r.get(timeout=60) for r in results) == list(range(100))
    overlap = max_overlap(fleet.lines())
    # One at a time would be 1; 100 sleeping greenlets overlap (most of them at once).
    assert overlap >= 50, f"at most {overlap} tasks ran at once\n{fleet.log_text()}"


@pytest.mark.parametrize("pool", GREEN_POOLS)
def test_async_tasks_overlap(fleet: PoolFleet, pool: str) -> None:
    """``async def`` tasks run in native threads (one loop each) while their greenlets wait,
    so they overlap too. Results, limits and the shutdown deadline of both pools are in
    the pool contract (``test_pool_contract.py``)."""
    fleet.start(pool, "-c", "20")
    naps = [fleet.module.anap.delay(n, 0.3) for n in range(10)]
    assert sorted(r.get(timeout=20) for r in naps) == list(range(10))
    assert max_overlap(fleet.lines()) >= 5


@pytest.mark.parametrize("pool", GREEN_POOLS)
def test_terminate_abort_and_stop_on_the_pool_itself(pool: str) -> None:
    _require(pool)
    out = subprocess.run([sys.executable, str(PROJ_DIR / "green_driver.py"), pool],
                         capture_output=True, text=True, timeout=60, cwd=PROJ_DIR)
    assert out.returncode == 0, out.stderr
    outcomes = json.loads(out.stdout.strip().splitlines()[-1])
    assert outcomes["terminate_returned"] is True
    assert outcomes["running"]["state"] == states.REVOKED
    assert outcomes["running"]["stored"] == states.REVOKED
    assert outcomes["aborted"] == {"state": states.SUCCESS, "value": "'shutdown'",
                                   "stored": states.SUCCESS}
    assert outcomes["finishing"]["value"] == "'slept'"
    assert outcomes["terminate_not_started"] is True
    assert outcomes["not_started"]["state"] == states.REVOKED
    assert outcomes["active_after"] == 0
    # stop() kills what outlived its wait, without reporting it: its message goes back.
    assert "stopped" not in outcomes
    assert outcomes["active_after_stop"] == 0


@pytest.mark.parametrize("pool", GREEN_POOLS)
def test_chosen_by_setting_alone_it_refuses_to_start(fleet: PoolFleet, pool: str) -> None:
    """Without ``-P`` on the command line nothing was monkey-patched: a clear error, status 64."""
    fleet.workers.env["POOLPROJ_WORKER_POOL"] = pool
    proc = fleet.workers.start(exit_codes={64}, why="a usage error is what this test wants")
    assert proc.wait(30) == 64
    assert "monkey-patched" in fleet.log_text()
