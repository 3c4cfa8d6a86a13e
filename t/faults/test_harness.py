"""The harness can see what it must report: a check that cannot fail proves nothing."""

from __future__ import annotations

from faults.harness import Tally, unhandled_errors
from faults.scenarios import Scenarios, check, shared_broker
from workers import expect

LOGGED = """[2026-01-01 10:00:00,000: ERROR/MainProcess] could not store a result
Traceback (most recent call last):
  File "x.py", line 1, in f
ValueError: handled, and logged
[2026-01-01 10:00:01,000: INFO/MainProcess] still going"""

CHAINED = """[2026-01-01 10:00:00,000: ERROR/MainProcess] could not store a result
Traceback (most recent call last):
  File "x.py", line 1, in f
ConnectionError: reset

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "x.py", line 2, in g
BackendError: handled, and logged with its cause
[2026-01-01 10:00:01,000: INFO/MainProcess] still going"""

THREAD = """[2026-01-01 10:00:00,000: INFO/MainProcess] ready
Exception in thread consumer:
Traceback (most recent call last):
  File "x.py", line 1, in run
RuntimeError: nobody caught this"""

MAIN = """[2026-01-01 10:00:00,000: INFO/MainProcess] ready

Traceback (most recent call last):
  File "x.py", line 1, in <module>
SystemError: the main thread died"""


def test_unhandled_errors_tells_a_logged_exception_from_an_unhandled_one() -> None:
    assert unhandled_errors(LOGGED) == []
    assert unhandled_errors(CHAINED) == []
    assert [e.splitlines()[0] for e in unhandled_errors(THREAD)] == [
        "Exception in thread consumer:"]
    assert len(unhandled_errors(MAIN)) == 1


def test_check_fails_each_broken_promise() -> None:
    assert check(Tally(sent=3, ended=3, exit_codes=[0]), duplicates_allowed=False) == []
    assert check(Tally(sent=3, ended=2, lost=1, exit_codes=[0]),
                 duplicates_allowed=False)[0].startswith("lost 1 of 3")
    assert check(Tally(sent=3, ended=3, duplicates=2, exit_codes=[0]),
                 duplicates_allowed=False)[0].startswith("2 duplicate run(s)")
    assert check(Tally(sent=3, ended=3, duplicates=2, exit_codes=[0]),
                 duplicates_allowed=True) == []
    assert check(Tally(sent=3, ended=3, forbidden_ran=1, exit_codes=[0]),
                 duplicates_allowed=True)[0].startswith("1 task(s) ran that must not")
    assert "exit codes [0, 1]" in check(Tally(exit_codes=[0, 1]), duplicates_allowed=False)[0]


def test_a_real_worker_s_unhandled_thread_exception_is_seen(faults: Scenarios) -> None:
    run = faults.open_run(shared_broker("redis"))
    proc = run.start_worker("-P", "threads", "-c", "2")
    expect(proc, unhandled_ok=True, why="the test makes it log an unhandled thread exception")
    run.send(3)
    run.client.send_task("fproj.crash_a_thread", ignore_result=True)
    run.send(3)
    assert run.wait_ended(60)
    tally = run.tally()
    assert tally.lost == 0 and tally.exit_codes == [0]
    assert any("Exception in thread fproj-crasher" in e for e in tally.unhandled), tally.logs
    assert check(tally, duplicates_allowed=False)[0].startswith("unhandled exception")
