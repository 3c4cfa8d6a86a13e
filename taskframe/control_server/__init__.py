"""A worker's end of remote control: it answers Celery's inspect and control commands.

* ``node``: ``ControlNode``, the worker's mailbox consumer on its own connection and thread.
* ``handlers``: one handler per command Celery sends (``ping``, ``active``, ``revoke``, ...).
* ``contract``: ``WorkerState``, what the handlers need of a worker (tested without a broker).
* ``worker_adapter``: ``WorkerControlState``, a running worker seen through that protocol.
* ``info``: reply pieces Celery's tools expect (queue descriptions, broker info, rusage).

The client's side (``app.control``, the mailbox topology) is ``taskframe.control``.
"""
