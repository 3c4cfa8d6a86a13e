"""Running one task: the executor every pool and the eager path share.

Below the pools and the worker: it knows a task and its request (``Context``), not how the
request arrived or which pool runs it.

* ``executor``: ``execute()``: signals, the body, retries, the outcome, the stored result.
* ``async_executor``: the same for ``async def`` tasks on the asyncio pool.
* ``coroutines``: running a coroutine body from a thread, a greenlet or a child process.
"""
