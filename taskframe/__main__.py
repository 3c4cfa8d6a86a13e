"""``python -m taskframe``: the same as the ``taskframe`` command."""

from taskframe.bootstrap import main

main()
