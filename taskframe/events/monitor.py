"""``taskframe events``: one line per event, for people (``--json``: for scripts).

A line reads ``time hostname type name[id] STATE details``, for example::

    2026-11-29 10:55:01.123 w1@host task-succeeded proj.add[6f1c...] SUCCESS runtime=0.002s result=5

Task names come with ``task-received`` (and ``task-sent``); the monitor
remembers them (the last ``NAME_CACHE`` tasks) to name the later events of the
same task.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

from taskframe.events.event import TASK_EVENT_STATES

__all__ = ["EventFormatter"]

NAME_CACHE = 10_000

# Shown after the state, in this order, when present.
_DETAILS = ("runtime", "result", "exception", "args", "kwargs", "eta", "expires", "retries",
            "requeue", "terminated", "signum", "expired", "active", "processed", "freq",
            "loadavg", "sw_ident", "sw_ver", "queue")


class EventFormatter:
    """Turns events into lines (``as_json``: one compact JSON object per line)."""

    def __init__(self, *, as_json: bool = False) -> None:
        self.as_json = as_json
        self._names: collections.OrderedDict[str, str] = collections.OrderedDict()

    def __call__(self, event: dict[str, Any]) -> str:
        """The line for ``event`` (without the newline)."""
        name = self._remember(event)
        if self.as_json:
            return json.dumps(event, default=str, sort_keys=True)
        kind = str(event.get("type", "?"))
        parts = [_when(event), str(event.get("hostname", "?")), kind]
        uuid = event.get("uuid")
        if uuid:
            parts.append(f"{name or '?'}[{uuid}]")
        state = TASK_EVENT_STATES.get(kind)
        if state:
            parts.append(state)
        parts += [_detail(key, event[key]) for key in _DETAILS
                  if key in event and event[key] not in (None, "")
                  and not (key == "retries" and event[key] == 0)]
        return " ".join(parts)

    def _remember(self, event: dict[str, Any]) -> str | None:
        uuid = event.get("uuid")
        if not isinstance(uuid, str):
            return None
        name = event.get("name")
        if isinstance(name, str) and name:
            self._names[uuid] = name
            self._names.move_to_end(uuid)
            while len(self._names) > NAME_CACHE:
                self._names.popitem(last=False)
            return name
        return self._names.get(uuid)

    def printer(self, echo: Callable[[str], Any]) -> Callable[[dict[str, Any]], None]:
        """A receiver handler that prints each event with ``echo``."""
        def handle(event: dict[str, Any]) -> None:
            echo(self(event))
        return handle


def _when(event: dict[str, Any]) -> str:
    stamp = event.get("timestamp")
    if not isinstance(stamp, int | float):
        return "-"
    return datetime.fromtimestamp(stamp).isoformat(sep=" ", timespec="milliseconds")


def _detail(key: str, value: Any) -> str:
    if key == "runtime" and isinstance(value, int | float):
        return f"runtime={value:.3f}s"
    if key == "loadavg" and isinstance(value, list | tuple):
        return "loadavg=" + ",".join(str(v) for v in value)
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{key}={text}"
