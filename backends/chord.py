"""The chord store interface: how a result backend counts the header tasks of a chord.

A chord's body is sent once, by the header task that ends last, counted atomically in
the result backend. ``Backend.chord_store()`` returns the backend's ``ChordStore``, or
``None`` when it has no atomic counter: then Celery's ``celery.chord_unlock`` task polls
the header's results instead (the only polling path).

Implementations:

* ``chord_counter.CounterChordStore``: any backend with ``incr`` (database, GCS, memory):
  the header is saved as a group and each part ``incr``\\ s ``chord-unlock-<group>``.
* ``redis_chord.RedisChordStore``: Celery's own chord keys on Redis, so Celery and
  taskframe workers complete one chord together.

The canvas calls, in this order:

1. ``record_header`` when a chord starts, before any header task is sent;
2. ``add_part`` for ``Task.add_to_chord``, before the added task is sent;
3. ``count_part`` once per header task, after its outcome was stored; the one call
   that returns ``Fired`` sends (or fails) the body;
4. ``release`` once that body was sent, or failed to be.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ChordStore", "Fired", "Part"]

#: One ended header task: (task id, state, value); the value is the exception for
#: exception states.
Part = tuple[str, str, Any]


@dataclass
class Fired:
    """This part completed the chord and won the right to send its body.

    Attributes:
        parts: every header task, in header order.
        shape: the header's result tuples when they hold group results (a Celery
            client saved them): the body gets a group's values as one list.
            ``None``: the values are flat.
        claim: the store's own proof of the claim, for ``release`` (Redis).
    """

    parts: list[Part] = field(default_factory=list)
    shape: list[Any] | None = None
    claim: str | None = None


class ChordStore(abc.ABC):
    """Counts the header tasks of chords in one result backend; safe to share between threads."""

    @abc.abstractmethod
    def record_header(self, group_id: str, task_ids: Sequence[str]) -> None:
        """Record a chord's header, ``task_ids`` in header order, before any is sent."""

    @abc.abstractmethod
    def add_part(self, group_id: str, task_id: str) -> None:
        """Count one more header task, ``task_id`` (``Task.add_to_chord``), before it is sent.

        Raises:
            ValueError: the store holds no header for ``group_id``.
        """

    @abc.abstractmethod
    def count_part(self, group_id: str, task_id: str, state: str, value: Any, *,
                   index: int | None = None, size: int | None = None) -> Fired | None:
        """Count header task ``task_id``, which ended in ``state`` with ``value``.

        Args:
            group_id: the chord's group id.
            task_id: the header task that ended.
            state: its final state.
            value: its return value, or the exception for exception states.
            index: its place in the header (``group_index``), when known.
            size: the header's size as the client sent it (``chord_size``), when known.

        Returns:
            ``Fired`` for the one part that completed the chord and must send the
            body; ``None`` for every other (and for a redelivered part counted again).
        """

    @abc.abstractmethod
    def release(self, group_id: str, fired: Fired) -> None:
        """Delete the chord's bookkeeping once its body was sent (or failed).

        What stays keeps a late copy of a header task from firing the body again.
        """
