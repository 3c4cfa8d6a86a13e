"""Code run in child processes by backend tests (spawned children import it by name)."""

from __future__ import annotations

from typing import Any

from taskframe.backends import BackendOptions, create_backend


def increment(url: str, table_names: dict[str, str], key: str, times: int) -> list[int]:
    """Open a fresh backend and call ``incr(key)`` ``times`` times; return the values seen."""
    backend = create_backend(url, BackendOptions(table_names=table_names))
    try:
        return [backend.incr(key) for _ in range(times)]
    finally:
        backend.close()


def increment_star(args: tuple[Any, ...]) -> list[int]:
    """``increment`` for ``Pool.map``."""
    return increment(*args)


def revoke(url: str, table_names: dict[str, str], task_ids: list[str]) -> None:
    """Open a fresh backend and record each id as revoked, one call per id."""
    from taskframe.control.revoked import RevokeStore

    backend = create_backend(url, BackendOptions(table_names=table_names))
    try:
        store = RevokeStore(backend)
        for task_id in task_ids:
            store.add([task_id], 600.0)
    finally:
        backend.close()


def revoke_star(args: tuple[Any, ...]) -> None:
    """``revoke`` for ``Pool.map``."""
    revoke(*args)
