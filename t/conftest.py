"""Puts ``t/`` on sys.path so tests can ``import services`` and other helpers; checks the
worker processes each test started (``workers.watch``): a worker that exits non-zero or
logs an unhandled exception fails the test that started it, unless the test said it
expects so (``workers.expect``)."""

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import workers  # noqa: E402


@pytest.fixture(autouse=True)
def _workers_end_well() -> Iterator[None]:
    """After the test and its fixtures (which stop their workers): check those that ended."""
    yield
    problems = workers.audit_watched()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture(autouse=True, scope="session")
def _all_workers_end_well() -> Iterator[None]:
    """Workers of longer-lived fixtures, and any left running: stopped and checked last."""
    yield
    problems = workers.audit_watched(final=True)
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)
