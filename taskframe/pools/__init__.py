"""Worker pools: one module each."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from taskframe.errors import ImproperlyConfigured
from taskframe.pools.base import Pool, TaskJob
from taskframe.pools.prefork import PreforkPool
from taskframe.pools.solo import SoloPool
from taskframe.pools.threads import ThreadPool

__all__ = ["POOLS", "Pool", "PreforkPool", "SoloPool", "TaskJob", "ThreadPool",
           "get_pool_class"]


def _gevent_pool() -> type[Pool]:
    from taskframe.pools.gevent import GeventPool

    return GeventPool


def _eventlet_pool() -> type[Pool]:
    from taskframe.pools.eventlet import EventletPool

    return EventletPool


def _asyncio_pool() -> type[Pool]:
    from taskframe.pools.asyncio import AsyncioPool

    return AsyncioPool


class _PoolTable(Mapping[str, type[Pool]]):
    """``-P`` name -> pool class; some classes are imported only when looked up.

    Importing gevent or eventlet before the CLI monkey-patched (``taskframe.bootstrap``)
    would break them, so their modules wait until a worker asks for them.
    """

    def __init__(self, classes: dict[str, type[Pool]],
                 loaders: dict[str, Callable[[], type[Pool]]]) -> None:
        self._classes = dict(classes)
        self._loaders = dict(loaders)

    def __getitem__(self, name: str) -> type[Pool]:
        if name not in self._classes:
            loader = self._loaders[name]
            try:
                self._classes[name] = loader()
            except ImportError as exc:
                raise ImproperlyConfigured(
                    f"the {name} pool needs a package that is not installed: {exc}") from exc
        return self._classes[name]

    def __contains__(self, name: object) -> bool:
        return name in self._classes or name in self._loaders

    def __iter__(self) -> Iterator[str]:
        return iter(sorted({*self._classes, *self._loaders}))

    def __len__(self) -> int:
        return len({*self._classes, *self._loaders})


#: ``-P`` name -> pool class.
POOLS: Mapping[str, type[Pool]] = _PoolTable(
    {"prefork": PreforkPool, "solo": SoloPool, "threads": ThreadPool},
    {"asyncio": _asyncio_pool, "eventlet": _eventlet_pool, "gevent": _gevent_pool},
)


def get_pool_class(name: str) -> type[Pool]:
    """The pool class for ``-P name``."""
    try:
        return POOLS[name]
    except KeyError:
        known = ", ".join(sorted(POOLS))
        raise ImproperlyConfigured(f"unknown pool {name!r}: choose one of {known}") from None
