"""Worker pools: one module each."""

from __future__ import annotations

from taskframe.errors import ImproperlyConfigured
from taskframe.pools.base import Pool, TaskJob
from taskframe.pools.solo import SoloPool
from taskframe.pools.threads import ThreadPool

__all__ = ["POOLS", "Pool", "SoloPool", "TaskJob", "ThreadPool", "get_pool_class"]

#: ``-P`` name -> pool class.
POOLS: dict[str, type[Pool]] = {"solo": SoloPool, "threads": ThreadPool}


def get_pool_class(name: str) -> type[Pool]:
    """The pool class for ``-P name``."""
    try:
        return POOLS[name]
    except KeyError:
        known = ", ".join(sorted(POOLS))
        raise ImproperlyConfigured(
            f"unknown pool {name!r}: this version has {known} (prefork, gevent, eventlet "
            "and asyncio are not implemented yet)"
        ) from None
