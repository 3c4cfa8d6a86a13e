"""Revoked task ids in Google Cloud Storage: one JSON object, changed by compare-and-swap.

``<base_path>/taskframe-revoked`` holds ``{task_id: expires_at}``. An add reads the object
and its generation, merges (an id already there keeps the later expiry, expired ids are
dropped) and writes it back with ``if_generation_match``; a 412 means another writer got
in between, so it reads again. No writer's ids are ever lost. The version a worker
checks before loading is the object's generation (one metadata request).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Mapping
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import storage  # type: ignore[import-untyped]
from google.cloud.storage.retry import DEFAULT_RETRY  # type: ignore[import-untyped]

from taskframe.backends.base import live_revokes
from taskframe.errors import BackendError

__all__ = ["REVOKED_OBJECT", "add", "load", "version"]

REVOKED_OBJECT = "taskframe-revoked"
#: Compare-and-swap attempts of one add before it gives up.
MAX_ATTEMPTS = 1000


def add(bucket: storage.Bucket, name: str, entries: Mapping[str, float]) -> None:
    """Merge ``entries`` into object ``name`` by compare-and-swap on its generation.

    Raises:
        BackendError: too many concurrent writers.
    """
    for attempt in range(MAX_ATTEMPTS):
        blob = bucket.get_blob(name)
        generation = 0 if blob is None else int(blob.generation)
        stored = {} if blob is None else _read(blob, generation)
        if stored is None:
            continue  # replaced meanwhile: read again
        for task_id, expires_at in entries.items():
            stored[task_id] = max(float(expires_at), stored.get(task_id, 0.0))
        data = json.dumps(stored).encode()
        try:
            bucket.blob(name).upload_from_string(
                data, content_type="application/json", if_generation_match=generation,
                retry=DEFAULT_RETRY)
            return
        except gexc.PreconditionFailed:
            time.sleep(random.uniform(0, min(0.002 * 2**min(attempt, 6), 0.1)))
    raise BackendError(f"revoked ids ({name}): too many concurrent writers")


def load(bucket: storage.Bucket, name: str) -> dict[str, float]:
    """The ids not expired yet (empty when the object does not exist)."""
    try:
        raw = bucket.blob(name).download_as_bytes(retry=DEFAULT_RETRY)
    except gexc.NotFound:
        return {}
    return live_revokes(_decode(raw))


def version(bucket: storage.Bucket, name: str) -> str:
    """The object's generation (``""`` when it does not exist)."""
    blob = bucket.get_blob(name)
    return "" if blob is None else str(blob.generation)


def _read(blob: storage.Blob, generation: int) -> dict[str, float] | None:
    try:
        raw = blob.download_as_bytes(if_generation_match=generation)
    except (gexc.NotFound, gexc.PreconditionFailed):
        return None
    return live_revokes(_decode(raw))


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return {}  # unreadable: start again rather than fail every revoke
