"""Result backends: where task states and return values are stored.

``create_backend(url, options)`` picks the backend by the URL's scheme from
``LOADERS``, a plain dict of functions that import their module only when used
(so ``sqlalchemy`` is not imported by an app that stores results in Redis).

Schemes: ``memory://``; ``db+<SQLAlchemy URL>`` and ``sqlite://`` (database);
``redis://``, ``rediss://``, ``redis+socket://``, ``sentinel://`` (redis);
``gs://bucket/path`` (gcs); ``rpc://`` (results as messages on the app's broker);
``disabled://``, ``None`` or ``""`` (no backend: reads raise
``BackendNotConfigured``).
"""

from __future__ import annotations

from collections.abc import Callable

from taskframe.backends.base import Backend, BackendOptions
from taskframe.errors import ImproperlyConfigured

__all__ = ["Backend", "BackendOptions", "create_backend", "needs_task_call", "scheme_of"]

#: Schemes whose backend must hear of each task before it is sent (``on_task_call``).
TASK_CALL_SCHEMES = frozenset({"rpc"})


def _memory() -> type[Backend]:
    from taskframe.backends.memory import MemoryBackend

    return MemoryBackend


def _database() -> type[Backend]:
    from taskframe.backends.database import DatabaseBackend

    return DatabaseBackend


def _redis() -> type[Backend]:
    from taskframe.backends.redis import RedisBackend

    return RedisBackend


def _gcs() -> type[Backend]:
    from taskframe.backends.gcs import GCSBackend

    return GCSBackend


def _rpc() -> type[Backend]:
    from taskframe.backends.rpc import RPCBackend

    return RPCBackend


def _disabled() -> type[Backend]:
    from taskframe.backends.disabled import DisabledBackend

    return DisabledBackend


#: URL scheme -> function returning the backend class (imports lazily).
LOADERS: dict[str, Callable[[], type[Backend]]] = {
    "db": _database,
    "disabled": _disabled,
    "gs": _gcs,
    "memory": _memory,
    "redis": _redis,
    "rediss": _redis,
    "rpc": _rpc,
    "sentinel": _redis,
    "sqlite": _database,
}


def scheme_of(url: str) -> str:
    """The scheme that picks the backend: ``db`` for ``db+postgresql://...``."""
    scheme = url.partition("://")[0].lower() if "://" in url else url.lower()
    return scheme.partition("+")[0]


def needs_task_call(url: str | None) -> bool:
    """True when the backend of ``url`` wants ``on_task_call`` before each task is sent.

    Decided by the scheme alone, so the app does not build (or import) a backend
    just to send a task.
    """
    return bool(url) and scheme_of(str(url)) in TASK_CALL_SCHEMES


def create_backend(url: str | None, options: BackendOptions) -> Backend:
    """Build the backend for ``url`` (the ``result_backend`` setting).

    Raises:
        ImproperlyConfigured: the scheme is unknown, or the backend refuses the
            URL or its options.
    """
    if not url:
        return _disabled()("disabled://", options)
    scheme = scheme_of(url)
    loader = LOADERS.get(scheme)
    if loader is None:
        known = ", ".join(f"{name}://" for name in sorted(LOADERS))
        raise ImproperlyConfigured(
            f"unknown result backend {url!r}: scheme {scheme!r} is not one of {known} "
            "(set result_backend to one of these, e.g. 'db+sqlite:///results.sqlite3')"
        )
    return loader()(url, options)
