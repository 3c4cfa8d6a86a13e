"""``python -m taskframe``: the same as the ``taskframe`` command."""

from taskframe.cli.bootstrap import main

main()
