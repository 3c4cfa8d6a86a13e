"""The task message as taskframe sees it: one typed object, whatever the wire said.

``TaskMessage`` is what ``encode_task`` turns into Celery protocol v2 headers,
properties and body, and what ``decode_task`` produces from a v2 or v1 message.
The rest of taskframe never touches the wire dicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

__all__ = ["TaskMessage"]


@dataclass
class TaskMessage:
    """One task invocation, decoded.

    Header fields follow ../shared/spec/celery-wire.md §1.1; ``callbacks``,
    ``errbacks``, ``chain`` and ``chord`` are the body's ``embed`` (signature
    dicts, kept as dicts here); ``properties`` keeps the AMQP properties that
    matter to the worker (``correlation_id``, ``reply_to``, ``priority``).
    """

    id: str
    name: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    eta: datetime | None = None
    expires: datetime | None = None
    retries: int = 0
    group: str | None = None
    group_index: int | None = None
    root_id: str | None = None
    parent_id: str | None = None
    time_limit: float | None = None
    soft_time_limit: float | None = None
    shadow: str | None = None
    origin: str | None = None
    ignore_result: bool | None = None
    argsrepr: str = ""
    kwargsrepr: str = ""
    replaced_task_nesting: int = 0
    stamped_headers: list[str] | None = None
    stamps: dict[str, Any] = field(default_factory=dict)
    callbacks: list[dict[str, Any]] | None = None
    errbacks: list[dict[str, Any]] | None = None
    chain: list[dict[str, Any]] | None = None
    chord: dict[str, Any] | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    priority: int | None = None
    extra_headers: dict[str, Any] = field(default_factory=dict)
