"""Remote control on Celery's mailbox ("pidbox"): inspect and steer workers, durable revokes.

* ``mailbox``: the pidbox exchanges and queues, request/reply messages, the client's broadcast.
* ``client``: ``app.control`` (``Control``) and ``app.control.inspect()`` (``Inspect``).
* ``node``: ``ControlNode``, a worker's end of the mailbox (own connection and thread).
* ``panel``: the inspect/control handlers, on the ``WorkerState`` protocol (``state``).
* ``worker_state``: the worker seen through ``WorkerState``; ``RemoteControl`` starts it all.
* ``revoked``: the bounded revoked set, the ``--statedb`` file, the shared revoke store.
* ``cli``: ``taskframe inspect``, ``control``, ``revoke`` and ``status``.
"""
