"""``Outcome``: how one run of a task ended, as the executor returns it to a pool.

A module of its own, light to import: pools and the prefork parent build outcomes
(time limits, lost workers) without loading the executor and the canvas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Outcome"]


@dataclass
class Outcome:
    """How one run ended. ``state`` is SUCCESS, FAILURE, RETRY, IGNORED or REJECTED.

    ``delivery_failed``: with ``requeue``, the run was lost with the process running it
    (a prefork child that died): the requeue counts toward ``worker_delivery_limit``.
    """

    state: str
    retval: Any = None
    traceback: str | None = None
    requeue: bool = False
    delivery_failed: bool = False
