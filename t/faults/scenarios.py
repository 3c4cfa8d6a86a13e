"""The scenario runner: each scenario ``repeat`` times, one summary line, the assertions.

The assertions of every run: lost = 0; duplicates = 0 unless the scenario's semantics
allow them (then counted and reported); every worker exits 0 after a warm shutdown;
no worker log shows an unhandled exception.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import services
from faults.harness import Broker, Run, Tally

__all__ = ["SUMMARY", "Scenarios", "check", "shared_broker"]

#: The summary lines of the session, shown at its end (conftest's terminal summary).
SUMMARY: pytest.StashKey[list[str]] = pytest.StashKey()


def _first_lines(text: str, pattern: tuple[str, ...], limit: int) -> str:
    hits = [ln for ln in text.splitlines() if any(p in ln for p in pattern)]
    return "\n".join(hits[:limit])


def check(tally: Tally, *, duplicates_allowed: bool) -> list[str]:
    """What is wrong with one run: the suite's assertions, as messages."""
    wrong = []
    if tally.lost:
        wrong.append(f"lost {tally.lost} of {tally.sent} (ended {tally.ended})")
    if tally.forbidden_ran:
        wrong.append(f"{tally.forbidden_ran} task(s) ran that must not (revoked, expired or "
                     "malformed)")
    if tally.duplicates and not duplicates_allowed:
        wrong.append(f"{tally.duplicates} duplicate run(s) ({tally.starts} starts)")
    if any(code != 0 for code in tally.exit_codes):
        wrong.append(f"worker exit codes {tally.exit_codes} (want every one 0)")
    if tally.unhandled:
        wrong.append("unhandled exception(s) in worker logs:\n" + "\n".join(tally.unhandled[:3]))
    return wrong


class Scenarios:
    """Runs one scenario ``repeat`` times, reports it, and asserts on every run."""

    def __init__(self, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        self.name = request.node.name.removeprefix("test_")
        self.repeat = max(1, int(request.config.getoption("--repeat")))
        self.results = Path(request.config.getoption("--faults-results"))
        self.config = request.config
        self.tmp_path = tmp_path
        self.open: list[Run] = []

    def runs(self, broker: Broker, *, duplicates_allowed: bool = False,
             before: Callable[[int], None] | None = None, **options: Any) -> Iterator[Run]:
        """Yield a fresh ``Run`` per repetition; then print, record and assert.

        Args:
            duplicates_allowed: the semantics allow a second run (acks_late and a crash):
                duplicates are counted and reported, not failed.
            before: called with the repetition's index before its ``Run`` is made.
            options: for ``Run`` (``worker_url``, ``conf``).
        """
        tallies: list[Tally] = []
        started = time.monotonic()
        for i in range(self.repeat):
            if before is not None:
                before(i)
            directory = self.tmp_path / f"run{i}"
            directory.mkdir()
            run = Run(directory, broker, **options)
            self.open.append(run)
            try:
                yield run
                tallies.append(run.tally_ or run.tally())
            finally:
                self.close()
        self._report(tallies, time.monotonic() - started, duplicates_allowed)

    def open_run(self, broker: Broker, **options: Any) -> Run:
        """One ``Run`` outside ``runs`` (not repeated, not reported); closed at teardown."""
        directory = self.tmp_path / f"single{len(self.open)}"
        directory.mkdir()
        run = Run(directory, broker, **options)
        self.open.append(run)
        return run

    def close(self) -> None:
        """Close every run still open (a scenario that failed half-way leaves one)."""
        while self.open:
            self.open.pop().close()

    def _report(self, tallies: list[Tally], seconds: float, duplicates_allowed: bool) -> None:
        total = Tally()
        for t in tallies:
            total.sent += t.sent
            total.lost += t.lost
            total.duplicates += t.duplicates
            total.interrupted += t.interrupted
            total.forbidden_ran += t.forbidden_ran
        line = (f"scenario={self.name} runs={len(tallies)} tasks={total.sent} "
                f"lost={total.lost} duplicates={total.duplicates} seconds={seconds:.1f}")
        if total.interrupted:
            line += f" interrupted={total.interrupted}"
        if total.forbidden_ran:
            line += f" ran_forbidden={total.forbidden_ran}"
        print("\n" + line)
        self.config.stash.setdefault(SUMMARY, []).append(line)
        with self.results.open("a") as out:
            out.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")
        failures = []
        for i, tally in enumerate(tallies):
            wrong = check(tally, duplicates_allowed=duplicates_allowed)
            if wrong:
                failures.append((i, tally, wrong))
        if failures:
            i, tally, _ = failures[0]
            detail = "\n".join(f"run {n}: " + "; ".join(w + t.notes) for n, t, w in failures)
            lines = _first_lines(tally.logs, ("WARNING", "ERROR", "CRITICAL", "Exception"), 60)
            raise AssertionError(f"{line}\n{detail}\n--- warnings and errors of run {i}:\n"
                                 f"{lines}")


def shared_broker(kind: str) -> Broker:
    """The shared server of ``kind`` (skipped loudly when down)."""
    if kind == "redis":
        return Broker("redis", services.redis_url())
    return Broker("amqp", services.rabbitmq_url())


