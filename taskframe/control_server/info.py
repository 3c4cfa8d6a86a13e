"""Reply pieces Celery's tools expect: queue descriptions, broker info, rusage, settings."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from taskframe.transport import Queue
from taskframe.transport.url import parse_url, safe_url

__all__ = ["broker_info", "iso", "jsonable", "queue_info", "rusage", "scheme", "secret"]


def queue_info(queue: Queue) -> dict[str, Any]:
    """``Queue.as_dict(recurse=True)`` as kombu writes it (the keys Flower reads)."""
    exchange = queue.bound_exchange
    arguments = dict(queue.arguments)
    return {
        "name": queue.name,
        "exchange": {"name": exchange.name, "type": exchange.type,
                     "arguments": dict(exchange.arguments) or None,
                     "durable": exchange.durable, "passive": False,
                     "auto_delete": exchange.auto_delete, "delivery_mode": None,
                     "no_declare": False},
        "routing_key": queue.bound_routing_key,
        "queue_arguments": arguments or None,
        "binding_arguments": None,
        "consumer_arguments": None,
        "durable": queue.durable,
        "exclusive": queue.exclusive,
        "auto_delete": queue.auto_delete,
        "no_ack": False,
        "alias": None,
        "bindings": [],
        "no_declare": None,
        "expires": _ms(arguments.get("x-expires")),
        "message_ttl": _ms(arguments.get("x-message-ttl")),
        "max_length": arguments.get("x-max-length"),
        "max_length_bytes": arguments.get("x-max-length-bytes"),
        "max_priority": queue.max_priority,
    }


def broker_info(url: str, transport_options: Mapping[str, Any]) -> dict[str, Any]:
    """``stats['broker']``: kombu's ``Connection.info()`` keys, password left out."""
    first = url.split(";")[0]
    try:
        parsed = parse_url(first)
        hostname, port, userid = parsed.host, parsed.port, parsed.user
        vhost, transport = parsed.virtual_host, parsed.transport
    except Exception:
        hostname = userid = vhost = None
        port = None
        transport = scheme(first)
    return {
        "hostname": hostname, "userid": userid, "virtual_host": vhost, "port": port,
        "insist": False, "ssl": first.startswith(("amqps", "rediss")),
        "transport": transport, "connect_timeout": 4, "transport_options":
        {k: jsonable(v) for k, v in transport_options.items()},
        "login_method": None, "uri_prefix": None, "heartbeat": 120.0,
        "failover_strategy": "round-robin", "alternates": [], "credential_provider": None,
    }


def rusage() -> dict[str, Any] | str:
    """``stats['rusage']`` from ``getrusage``, or ``"N/A"`` where there is none."""
    try:
        import resource
    except ImportError:
        return "N/A"
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"utime": r.ru_utime, "stime": r.ru_stime, "maxrss": r.ru_maxrss,
            "ixrss": r.ru_ixrss, "idrss": r.ru_idrss, "isrss": r.ru_isrss,
            "minflt": r.ru_minflt, "majflt": r.ru_majflt, "nswap": r.ru_nswap,
            "inblock": r.ru_inblock, "oublock": r.ru_oublock, "msgsnd": r.ru_msgsnd,
            "msgrcv": r.ru_msgrcv, "nsignals": r.ru_nsignals, "nvcsw": r.ru_nvcsw,
            "nivcsw": r.ru_nivcsw}


def _ms(value: Any) -> float | None:
    return None if value is None else float(value) / 1000


def iso(unix: float | None) -> str | None:
    return None if unix is None else datetime.fromtimestamp(unix, UTC).isoformat()


def scheme(url: str | None) -> str:
    return (url or "disabled").split("://", 1)[0]


def secret(name: str) -> bool:
    lowered = name.lower()
    return any(w in lowered for w in ("password", "secret", "key_", "token"))


def jsonable(value: Any) -> Any:
    """JSON-safe copy of a setting; URLs lose their passwords."""
    if isinstance(value, str):
        if "://" in value and "@" in value:
            return safe_url(value)
        return value
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    return repr(value)
