"""The fault-injection suite: its options, its marker, the scenario runner and servers.

``pytest t/faults`` runs the suite alone (every test here is marked ``faults``, so
``-m faults`` / ``-m "not faults"`` select it too). ``--repeat N`` runs each
scenario N times (``make faults FAULTS_ARGS=--repeat=20``); each scenario prints one
summary line (scenario, runs, tasks, lost, duplicates, seconds), shown again at the
end of the session and appended to ``--faults-results`` (default
``faults-results.txt`` at the repository's root).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faults.scenarios import SUMMARY, Scenarios
from faults.servers import RabbitNode, RedisNode

HERE = Path(__file__).resolve().parent


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("faults", "fault-injection suite (t/faults)")
    group.addoption("--repeat", type=int, default=1, metavar="N",
                    help="run each fault scenario N times (a soak); default 1")
    group.addoption("--faults-results", default=str(HERE.parent.parent / "faults-results.txt"),
                    metavar="FILE", help="append each scenario's summary line to FILE")
    group.addoption("--run-open-defects", action="store_true",
                    help="also run the scenarios of OPEN_DEFECTS (they fail until fixed)")


# Scenarios that fail today because of a defect that is open, named here so that every run
# says so (deselected, and listed with this reason at the end of the run) instead of going
# red or being dropped. Run them with --run-open-defects. Remove an entry when its defect is
# fixed. (Empty: the early-ack window of issue 14, Why 6, was the last.)
OPEN_DEFECTS: dict[str, str] = {}


_OPEN: pytest.StashKey[list[str]] = pytest.StashKey()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_open = config.getoption("--run-open-defects")
    kept, held_back = [], []
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.faults)
            if not run_open and f"{item.path.name}::{item.name}" in OPEN_DEFECTS:
                held_back.append(item)
                continue
        kept.append(item)
    if held_back:
        config.hook.pytest_deselected(items=held_back)
        items[:] = kept
        config.stash[_OPEN] = [
            f"{item.path.name}::{item.name}: {OPEN_DEFECTS[f'{item.path.name}::{item.name}']}"
            for item in held_back]


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    held_back = config.stash.get(_OPEN, [])
    if held_back:
        terminalreporter.section("fault scenarios NOT RUN: open defects (--run-open-defects)")
        for line in held_back:
            terminalreporter.write_line(line)
    lines = config.stash.get(SUMMARY, [])
    if lines:
        terminalreporter.section("fault scenarios")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture
def faults(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Scenarios]:
    scenarios = Scenarios(request, tmp_path)
    yield scenarios
    scenarios.close()


@pytest.fixture
def redis_node(tmp_path: Path) -> Iterator[RedisNode]:
    """A redis-server of the test's own (AOF, fsync always) on a spare port."""
    node = RedisNode(tmp_path)
    node.start()
    yield node
    node.stop()


@pytest.fixture(scope="session")
def rabbit_node() -> Iterator[RabbitNode]:
    """A RabbitMQ node of the suite's own (started once, ~6 s), halted at the end."""
    node = RabbitNode()
    try:
        node.start()
        yield node
    finally:
        node.stop()
