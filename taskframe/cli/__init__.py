"""The ``taskframe`` command. This package imports nothing itself: ``bootstrap`` must run first.

* ``bootstrap``: the entry point; monkey-patches for ``-P gevent|eventlet`` before any import.
* ``main``: the click group, ``-A``, and the small commands (``call``, ``result``, ...).
* ``worker``: ``taskframe worker``.
* ``control``: ``inspect``, ``control``, ``revoke``, ``status``.
* ``events``: ``taskframe events`` and the worker's event options.
"""
