"""``taskframe.cli.bootstrap``: the pool is read from the raw command line, before any import."""

from __future__ import annotations

import subprocess
import sys

import pytest

from taskframe.cli.bootstrap import pool_from_argv


@pytest.mark.parametrize(("argv", "pool"), [
    (["-A", "proj", "worker", "-P", "gevent"], "gevent"),
    (["-A", "proj", "worker", "-c", "10", "--pool", "eventlet"], "eventlet"),
    (["-A", "proj", "worker", "--pool=gevent", "-l", "INFO"], "gevent"),
    (["-A", "proj", "worker", "-Pgevent"], "gevent"),
    (["-A", "worker", "worker", "-P", "gevent"], "gevent"),  # an app module named worker
    (["-A", "proj", "worker"], None),
    (["-A", "proj", "worker", "-P"], None),
    (["-A", "proj", "call", "add", "-P", "gevent"], None),  # not the worker command
    (["-A", "proj", "worker", "--", "-P", "gevent"], None),
])
def test_pool_from_argv(argv: list[str], pool: str | None) -> None:
    assert pool_from_argv(argv) == pool


def test_the_command_imports_no_greenlet_library_unless_asked() -> None:
    code = ("import sys\nsys.argv = ['taskframe', '--version']\n"
            "from taskframe.cli.bootstrap import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('gevent' in sys.modules, 'eventlet' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False False"
