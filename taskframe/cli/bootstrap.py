"""The ``taskframe`` command's entry point: monkey-patch first, then run the CLI.

gevent and eventlet only work when they patch the standard library (socket,
threading, time, ...) before anything else imports it. So the console script
(``taskframe``, and ``python -m taskframe``) starts here: it looks at the raw
command line for ``worker ... -P gevent`` / ``--pool=eventlet``, patches, and
only then imports the CLI and everything behind it. The ``worker_pool`` setting
is not known this early (the app is not imported yet), so greenlet pools are
chosen on the command line, as with Celery.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main", "monkey_patch", "pool_from_argv"]

GREEN_POOLS = ("gevent", "eventlet")


def pool_from_argv(argv: Sequence[str]) -> str | None:
    """The ``-P``/``--pool`` value given to the ``worker`` command in ``argv``, if any."""
    try:
        start = list(argv).index("worker") + 1
    except ValueError:
        return None
    args = list(argv[start:])
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg in ("-P", "--pool"):
            return args[i + 1] if i + 1 < len(args) else None
        if arg.startswith("--pool="):
            return arg.partition("=")[2]
        if arg.startswith("-P") and not arg.startswith("--"):
            return arg[2:].lstrip("=")
    return None


def monkey_patch(pool: str | None) -> bool:
    """Patch the standard library for ``pool`` (gevent, eventlet); True if patched."""
    if pool == "gevent":
        try:
            from gevent import monkey
        except ImportError:
            return False  # the pool lookup reports the missing package
        monkey.patch_all()
        return True
    if pool == "eventlet":
        try:
            import eventlet
        except ImportError:
            return False
        eventlet.monkey_patch()
        return True
    return False


def main() -> None:
    """Run the ``taskframe`` command (the console script)."""
    monkey_patch(pool_from_argv(sys.argv[1:]))
    from taskframe.cli.main import main as cli_main

    cli_main()
