"""The client API: the app, tasks, routing and sending, as a program that calls tasks uses them.

* ``app``: ``Taskframe`` (alias ``Celery``), its settings, backend, connections and ``send_task``.
* ``task``: ``Task``: ``delay``/``apply_async``/``apply``/``retry``, signatures of a task.
* ``router``: where a task message goes (``task_routes``, ``task_queues``, per-call options).
* ``builtins``: the tasks every app registers for Celery's canvases (``celery.chord_unlock``, ...).
"""
