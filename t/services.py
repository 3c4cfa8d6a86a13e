"""Where the test servers are, and whether they answer.

Each ``*_url()`` checks its server once per run (a TCP connect on loopback).
Unreachable: the test is skipped with a loud reason, or fails when
``TASKFRAME_REQUIRE_SERVICES=1`` (CI must not skip silently). ``require_module``
does the same for an optional package. These are the only ways a test may skip
(``t/unit/test_skips.py`` fails on any other ``skip``/``skipif``/``importorskip``).
"""

from __future__ import annotations

import functools
import importlib
import os
import socket
from collections.abc import Sequence
from types import ModuleType
from typing import NoReturn

import pytest

REQUIRE_ENV = "TASKFRAME_REQUIRE_SERVICES"


@functools.cache
def _unreachable(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be reached, or ``None`` when it can."""
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def require_service(name: str, host: str, port: int) -> None:
    """Skip (or fail, with ``TASKFRAME_REQUIRE_SERVICES=1``) unless the server answers."""
    why = _unreachable(host, port)
    if why is None:
        return
    message = (
        f"!!! {name} is NOT reachable at {host}:{port} ({why}); tests needing it "
        f"are skipped. Start it, or set {REQUIRE_ENV}=1 to turn this into a failure."
    )
    unavailable(message)


def unavailable(message: str) -> NoReturn:
    """Skip the test (or the module, at import) loudly, or fail it when
    ``TASKFRAME_REQUIRE_SERVICES=1``."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(message, pytrace=False)
    pytest.skip(message, allow_module_level=True)


def require_module(name: str) -> ModuleType:
    """Import an optional package the test needs; skip loudly (or fail) without it."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        unavailable(f"!!! the package {name!r} is NOT importable ({exc}); tests needing it "
                    f"are skipped. Install it, or set {REQUIRE_ENV}=1 to turn this into a "
                    f"failure.")


def postgres_url() -> str:
    """PostgreSQL on loopback (trust auth, user postgres, database ``test``)."""
    require_service("PostgreSQL", "127.0.0.1", 5432)
    return "postgresql://postgres@127.0.0.1:5432/test"


def mysql_url() -> str:
    """MariaDB on loopback (root, empty password, database ``test``)."""
    require_service("MariaDB", "127.0.0.1", 3306)
    return "mysql://root@127.0.0.1:3306/test"


def rabbitmq_url() -> str:
    """RabbitMQ on loopback (guest/guest, vhost ``/``)."""
    require_service("RabbitMQ", "127.0.0.1", 5672)
    return "amqp://guest:guest@127.0.0.1:5672//"


def redis_url(db: int = 0) -> str:
    """The shared Redis on loopback; use unique key names (or a key prefix) and clean up."""
    require_service("Redis", "127.0.0.1", 6379)
    return f"redis://127.0.0.1:6379/{db}"


def drop_broker_names(url: str, *, queues: Sequence[str] = (), exchanges: Sequence[str] = (),
                      db: int = 0) -> None:
    """Delete the queues and exchanges a test declared, on RabbitMQ or on Redis.

    On Redis: each queue's lists, and kombu's binding table (and deadline entry) of each
    queue and exchange name. Names must be unique to the test: they are deleted by prefix.
    """
    if url.startswith("redis"):
        import redis

        for name in (*queues, *exchanges):
            redis_delete_prefix(db, name)
            redis_delete_prefix(db, f"_kombu.binding.{name}")
            redis_delete_prefix(db, f"_kombu.binding_permanent.{name}")
        client = redis.Redis(host="127.0.0.1", port=6379, db=db)
        try:
            if exchanges:
                client.zrem("_kombu.binding_deadlines", *exchanges)
        finally:
            client.close()
        return
    from taskframe.transport.amqp import AMQPTransport

    admin = AMQPTransport(url, {})
    admin.connect()
    try:
        for name in queues:
            admin.delete_queue(name)
        for name in exchanges:
            admin.delete_exchange(name)
    finally:
        admin.close()


def redis_delete_prefix(db: int, prefix: str) -> int:
    """Delete every key of Redis database ``db`` that starts with ``prefix``; return how many."""
    import redis

    client = redis.Redis(host="127.0.0.1", port=6379, db=db)
    try:
        pattern = "".join("\\" + c if c in "*?[]\\" else c for c in prefix) + "*"
        keys = list(client.scan_iter(match=pattern, count=1000))
        return int(client.delete(*keys)) if keys else 0
    finally:
        client.close()
