"""rabbitmqctl helpers for the AMQP tests: close only the connections a test opened.

``rabbitmqctl close_all_connections`` would also cut other engineers' tests that
share the broker, so tests name their connections (the ``client_name`` transport
option) and close those.
"""

from __future__ import annotations

import subprocess

RABBITMQCTL_TIMEOUT = 120.0


def connection_pids(name_fragment: str) -> list[str]:
    """Pids of the connections whose ``connection_name`` contains ``name_fragment``."""
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
        capture_output=True, text=True, timeout=RABBITMQCTL_TIMEOUT, check=True,
    ).stdout
    pids = []
    for line in out.splitlines():
        pid, _, props = line.partition("\t")
        if pid.startswith("<") and '{"connection_name","' in props and name_fragment in props:
            pids.append(pid)
    return pids


def close_connections(name_fragment: str, reason: str = "closed by a taskframe test") -> int:
    """Close every connection named with ``name_fragment``; return how many."""
    pids = connection_pids(name_fragment)
    for pid in pids:
        subprocess.run(["rabbitmqctl", "-q", "close_connection", pid, reason],
                       capture_output=True, timeout=RABBITMQCTL_TIMEOUT, check=False)
    return len(pids)
