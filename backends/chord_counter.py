"""The generic chord store: chords counted with ``Backend.incr`` (database, GCS, memory).

``record_header`` saves the header's task ids as a group (``save_group``). Each header
task, as it ends, ``incr``\\ s Celery's counter key ``chord-unlock-<group>``; the part
that ends the chord takes a fire claim (``chord-unlock-<group>.fired``), deletes the saved
header and returns the parts for the canvas to send the body; then ``release`` deletes
the two counters.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from taskframe import states
from taskframe.backends.chord import ChordStore, Fired
from taskframe.protocol.results import (
    ResultMeta,
    decode_result,
    flatten_ids,
    group_tuple,
    result_tuple,
)

if TYPE_CHECKING:
    from taskframe.backends.base import Backend

__all__ = ["FIRED", "CounterChordStore", "counter_key"]

logger = logging.getLogger("taskframe.chord_counter")

#: Suffix of the fire claim's counter.
FIRED = ".fired"


def counter_key(group_id: str) -> str:
    """Celery's chord counter key (``get_key_for_chord``)."""
    return f"chord-unlock-{group_id}"


class CounterChordStore(ChordStore):
    """Chords counted by ``incr`` on ``backend``, the header saved as a group."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def record_header(self, group_id: str, task_ids: Sequence[str]) -> None:
        """Save the header's task ids as group ``group_id``."""
        self.backend.save_group(group_id,
                                group_tuple(group_id, [result_tuple(i) for i in task_ids]))

    def add_part(self, group_id: str, task_id: str) -> None:
        """Append ``task_id`` to the saved header.

        Raises:
            ValueError: no header is saved for ``group_id``.
        """
        saved = self.backend.restore_group(group_id)
        if saved is None:
            raise ValueError(f"chord {group_id}: no header state to add to")
        saved[1].append(result_tuple(task_id))
        self.backend.save_group(group_id, saved)

    def count_part(self, group_id: str, task_id: str, state: str, value: Any, *,
                   index: int | None = None, size: int | None = None) -> Fired | None:
        """Count one part; when this one must end the chord, the parts in header order and
        the header's result tuples (their shape: a group result's values form one list).

        The part's own ``state`` and ``value`` are not used: the parts are read back
        from the backend. Who ends it: the part that brings the count to the size,
        finds every header result ready (a redelivered part may have counted twice)
        and then wins the fire claim, an ``incr`` of ``<counter>.fired`` that returns
        1. See ``release`` for why the claim is checked once more.
        """
        backend = self.backend
        key = counter_key(group_id)
        if size is None and backend.restore_group(group_id) is None:
            # A Celery client's chord with no saved header (Celery's database backend):
            # celery.chord_unlock drives it. Counting would only leave a counter behind.
            return None
        count = backend.incr(key)
        if size is not None and count < size:
            return None
        saved = backend.restore_group(group_id)
        if saved is None:
            if size is not None:
                logger.warning("chord %s: no header state (already completed, or expired)",
                               group_id)
            return None  # no size and no saved header: a Celery chord_unlock drives it
        ids = flatten_ids(saved)
        if count < len(ids):
            return None
        metas = self._metas(ids)
        if any(meta.get("status") not in states.READY_STATES for meta in metas):
            return None  # counted twice (a redelivered part): a later part completes it
        if backend.incr(key + FIRED) != 1:
            return None
        if backend.restore_group(group_id) is None:
            # We read the header before the winner deleted it, and took a claim it had
            # already deleted: the chord is over. Our fresh claim is ours to drop.
            backend.delete_counter(key + FIRED)
            return None
        backend.delete_group(group_id)
        parts = [(tid, str(meta.get("status")), decode_result(meta))
                 for tid, meta in zip(ids, metas, strict=True)]
        return Fired(parts, list(saved[1]))

    def release(self, group_id: str, fired: Fired) -> None:
        """Delete a fired chord's counter, then its fire claim (Celery deletes its counter too).

        Why this cannot fire the body twice. The winner deletes, in this order: the
        header (``delete_group``, before sending the body), the counter, and last
        the claim. A late copy of a header task (a redelivery) then either
        (a) restarts the counter at 1, below the size: it stops; or
        (b) finds no header: it stops; or
        (c) read the header before it was deleted and reaches the claim: while the
            claim exists its ``incr`` returns 2 or more and it stops; if the claim
            is already deleted its ``incr`` returns 1, but the claim is deleted only
            after the header, so its second look at the header finds nothing and it
            stops (and deletes the claim it just made).
        Only a winner deletes the header, so no one can see a header after taking
        a claim unless no one fired yet. A worker dying between claim and cleanup
        leaves the two counters behind (never a second body), as it did before.
        Errors are logged, not raised: the body is already sent.
        """
        key = counter_key(group_id)
        try:
            self.backend.delete_counter(key)
            self.backend.delete_counter(key + FIRED)
        except Exception:
            logger.exception("chord %s: could not delete its counters", group_id)

    def _metas(self, ids: list[str]) -> list[ResultMeta]:
        """The metas of ``ids`` in order, in one round trip where the backend can."""
        found = self.backend.get_task_metas(ids)
        return [found[tid] for tid in ids]
