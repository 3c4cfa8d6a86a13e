"""Google Cloud Storage result backend: one object per result, Celery's names and bytes.

Features:

* Celery's layout (../shared/spec/celery-wire.md §6.5): object
  ``<base_path>/celery-task-meta-<task_id>`` (``celery-taskset-meta-<group_id>`` for
  groups, ``{"result": <group tuple>}``) holding the meta encoded with
  ``result_serializer``, so Celery's ``GCSBackend`` reads our results and we read its.
* A stored SUCCESS is never overwritten: writes carry a generation precondition
  (``if_generation_match``: 0 to create, else the generation whose content was
  checked); a 412 means another writer got in between, so we look again.
* ``incr``: a counter object ``<base_path>/<key>`` (count in its content and in
  its ``count`` metadata) updated by compare-and-swap on its generation, created
  with ``if_generation_match=0``, retried on 412. GCS alone: no Firestore.
* ``get_task_metas``: many metas read in parallel (a thread pool), for groups.
* Revoked ids: one JSON object changed by compare-and-swap (``gcs_revokes``).
* ``gcs_ttl``: each object gets ``custom_time = now + ttl`` (FAILURE results:
  ``now + failure_expires`` when that is set) for a bucket lifecycle ``Delete``
  rule with ``daysSinceCustomTime`` (as Celery does). The rule itself is the bucket
  owner's business: at first use the backend reads the bucket's rules and logs a
  warning when none matches (Celery refuses to start; we do not). ``cleanup``
  deletes metas older than ``expires`` (FAILURE: ``failure_expires``) by listing.
* ``task_result_exists``: the object exists.
* ``wait_for`` polls (GCS cannot push). Transient errors are retried by the
  client (``DEFAULT_RETRY``, as Celery does); every google-cloud error that still
  escapes becomes ``taskframe.errors.BackendError``.

URL: ``gs://<bucket>[/<base_path>][?gcs_project=<project>&gcs_ttl=<seconds>]``.
``STORAGE_EMULATOR_HOST`` points the client at an emulator (anonymous credentials).

Options (``BackendOptions``): ``serializer``, ``accept``, ``expires`` and
``failure_expires`` (for ``cleanup`` and ``custom_time``), ``extended``;
``transport_options`` (or URL query): ``gcs_project``, ``gcs_base_path`` (overrides
the URL's path), ``gcs_ttl``, ``gcs_threadpool_maxsize`` (10).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, TypeVar, cast
from urllib.parse import parse_qsl, unquote, urlsplit

from google.api_core import exceptions as gexc
from google.auth import exceptions as auth_exc
from google.cloud import storage  # type: ignore[import-untyped]
from google.cloud.storage.retry import DEFAULT_RETRY  # type: ignore[import-untyped]

from taskframe import states
from taskframe.backends import gcs_revokes
from taskframe.backends._codec import ResultCodec
from taskframe.backends.base import Backend, BackendOptions
from taskframe.errors import BackendError, DecodeError, ImproperlyConfigured
from taskframe.protocol.results import ResultContext, ResultMeta, make_meta

__all__ = ["GCSBackend"]

logger = logging.getLogger("taskframe.backends.gcs")

T = TypeVar("T")

# -- object name prefixes (Celery's, §6.5), under the base path --------------------------------
TASK_KEY_PREFIX = "celery-task-meta-"
GROUP_KEY_PREFIX = "celery-taskset-meta-"
#: Custom metadata field of a counter object holding its value.
COUNTER_FIELD = "count"

#: Compare-and-swap attempts before ``incr``/``store_result`` give up.
MAX_CAS_ATTEMPTS = 1000


class GCSBackend(Backend):
    """Results in GCS objects shared with Celery's ``GCSBackend``."""

    schemes: ClassVar[tuple[str, ...]] = ("gs",)

    def __init__(self, url: str, options: BackendOptions | None = None) -> None:
        super().__init__(url, options)
        parts = urlsplit(url)
        settings: dict[str, Any] = {**dict(parse_qsl(parts.query)),
                                    **self.options.transport_options}
        self.bucket_name = parts.netloc
        if not self.bucket_name:
            raise ImproperlyConfigured(f"result_backend {url!r}: gs:// URLs need a bucket name")
        base = settings.get("gcs_base_path")
        self.base_path = str(unquote(parts.path) if base is None else base).strip("/")
        self.project = settings.get("gcs_project")
        try:
            self.ttl = float(settings.get("gcs_ttl") or 0)
            self.pool_size = int(settings.get("gcs_threadpool_maxsize") or 10)
        except ValueError as exc:
            raise ImproperlyConfigured(f"result_backend {url!r}: {exc}") from exc
        self._codec = ResultCodec(self.options.serializer, self.options.accept,
                                  self.options.max_message_size)
        self._lock = threading.Lock()
        self._client: storage.Client | None = None
        self._bucket: storage.Bucket | None = None
        self._pid = os.getpid()
        self._lifecycle_checked = False

    # -- plumbing -------------------------------------------------------------------------

    def _get_bucket(self) -> storage.Bucket:
        with self._lock:
            if self._bucket is None or self._pid != os.getpid():
                # A forked child must not share the parent's HTTP sessions.
                self._client = storage.Client(project=self.project)
                self._bucket = self._client.bucket(self.bucket_name)
                self._pid = os.getpid()
                check = bool(self.ttl) and not self._lifecycle_checked
                self._lifecycle_checked = True
            else:
                check = False
            bucket = self._bucket
        if check:
            self.check_lifecycle(bucket)
        return bucket

    def check_lifecycle(self, bucket: storage.Bucket) -> bool:
        """Warn (once, at first use) when ``gcs_ttl`` has no lifecycle rule to act on it.

        Objects get ``custom_time = now + ttl``; only a bucket lifecycle rule
        ``{"action": {"type": "Delete"}, "condition": {"daysSinceCustomTime": N}}``
        deletes them. Celery refuses to start without a Delete rule; we log a
        warning and go on (reading the bucket's metadata may not be allowed).

        Returns:
            True when a matching rule was found.
        """
        try:
            bucket.reload(retry=DEFAULT_RETRY)
            rules = list(bucket.lifecycle_rules)
        except (gexc.GoogleAPIError, auth_exc.GoogleAuthError, OSError) as exc:
            logger.warning("gcs_ttl is set but the lifecycle rules of bucket %r could not be "
                           "read (%s): make sure a Delete rule with daysSinceCustomTime "
                           "exists, or results will never be deleted", self.bucket_name, exc)
            return False
        for rule in rules:
            if (rule.get("action", {}).get("type") == "Delete"
                    and "daysSinceCustomTime" in rule.get("condition", {})):
                return True
        logger.warning("gcs_ttl is set but bucket %r has no lifecycle rule "
                       "{action: Delete, condition: daysSinceCustomTime}: results past "
                       "their custom_time will NOT be deleted", self.bucket_name)
        return False

    def _run(self, what: str, fn: Callable[[storage.Bucket], T]) -> T:
        """Call ``fn(bucket)``; translate every google-cloud error at this edge."""
        try:
            return fn(self._get_bucket())
        except auth_exc.GoogleAuthError as exc:
            raise BackendError(f"{what}: no usable Google credentials: {exc}") from exc
        except gexc.GoogleAPIError as exc:
            raise BackendError(f"{what} failed: {type(exc).__name__}: {exc}") from exc
        except OSError as exc:  # requests' ConnectionError derives from OSError
            raise BackendError(f"{what} failed: {type(exc).__name__}: {exc}") from exc

    def object_name(self, key: str) -> str:
        """The object name of ``key`` under the base path."""
        return f"{self.base_path}/{key}" if self.base_path else key

    def _upload(self, bucket: storage.Bucket, name: str, data: bytes,
                generation: int | None = None, metadata: dict[str, str] | None = None,
                state: str | None = None) -> None:
        blob = bucket.blob(name)
        if self.ttl:
            ttl = self.ttl
            if state == states.FAILURE and self.options.failure_expires is not None:
                ttl = self.options.failure_expires
            blob.custom_time = datetime.now(UTC) + timedelta(seconds=ttl)
        if metadata:
            blob.metadata = metadata
        blob.upload_from_string(data, content_type=self._codec.content_type,
                                if_generation_match=generation, retry=DEFAULT_RETRY)

    @staticmethod
    def _download(bucket: storage.Bucket, name: str) -> bytes | None:
        try:
            return bucket.blob(name).download_as_bytes(  # type: ignore[no-any-return]
                retry=DEFAULT_RETRY)
        except gexc.NotFound:
            return None

    def _decode_meta(self, task_id: str, raw: bytes | None) -> ResultMeta:
        if raw is None:
            return make_meta(task_id, states.PENDING, None)
        meta = self._codec.decode(raw)
        if not isinstance(meta, dict):
            raise DecodeError(f"the result of {task_id} is not a meta: {type(meta).__name__}")
        for name, default in (("result", None), ("traceback", None), ("children", []),
                              ("date_done", None), ("task_id", task_id)):
            meta.setdefault(name, default)
        return cast(ResultMeta, meta)

    # -- task results ---------------------------------------------------------------------

    def store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        *,
        traceback: str | None = None,
        context: ResultContext | None = None,
    ) -> ResultMeta:
        """Store ``state``/``result``; a stored SUCCESS is kept and returned instead.

        Raises:
            EncodeError: the result cannot be serialized.
            BackendError: GCS failed.
        """
        meta = make_meta(task_id, state, result, traceback=traceback, context=context,
                         extended=self.options.extended)
        data = self._codec.encode(meta)
        name = self.object_name(TASK_KEY_PREFIX + task_id)

        def write(bucket: storage.Bucket) -> bytes | None:
            generation = 0  # most stores create the object: try that first
            for _ in range(MAX_CAS_ATTEMPTS):
                try:
                    self._upload(bucket, name, data, generation, state=state)
                    return None
                except gexc.PreconditionFailed:
                    pass
                blob = bucket.get_blob(name)
                if blob is None:
                    generation = 0
                    continue
                # Read the generation first: a download resets it from response headers.
                generation = int(blob.generation)
                current = self._download_generation(blob, generation)
                if current is not None and self._is_success(current):
                    return current
            raise BackendError(f"too many concurrent writers of {name}")

        kept = self._run(f"storing the result of {task_id}", write)
        return meta if kept is None else self._decode_meta(task_id, kept)

    @staticmethod
    def _download_generation(blob: storage.Blob, generation: int) -> bytes | None:
        try:
            return blob.download_as_bytes(  # type: ignore[no-any-return]
                if_generation_match=generation)
        except (gexc.NotFound, gexc.PreconditionFailed):
            return None  # replaced or deleted meanwhile: the conditional write will tell

    def _is_success(self, raw: bytes) -> bool:
        try:
            stored = self._codec.decode(raw)
        except Exception:  # unreadable bytes are not a SUCCESS we could keep
            return False
        return isinstance(stored, dict) and stored.get("status") == states.SUCCESS

    def get_task_meta(self, task_id: str) -> ResultMeta:
        """The stored meta, or a PENDING meta."""
        name = self.object_name(TASK_KEY_PREFIX + task_id)
        raw = self._run(f"reading the result of {task_id}",
                        lambda bucket: self._download(bucket, name))
        return self._decode_meta(task_id, raw)

    def get_task_metas(self, task_ids: Iterable[str]) -> dict[str, ResultMeta]:
        """The metas of ``task_ids``, downloaded in parallel (``gcs_threadpool_maxsize``)."""
        ids = list(dict.fromkeys(task_ids))
        if len(ids) <= 1:
            return {task_id: self.get_task_meta(task_id) for task_id in ids}
        workers = min(self.pool_size, len(ids))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return dict(zip(ids, pool.map(self.get_task_meta, ids), strict=True))

    def task_result_exists(self, task_id: str) -> bool:
        """True when the object of ``task_id`` exists."""
        name = self.object_name(TASK_KEY_PREFIX + task_id)
        return bool(self._run(f"checking the result of {task_id}",
                              lambda bucket: bucket.blob(name).exists(retry=DEFAULT_RETRY)))

    def forget(self, task_id: str) -> None:
        """Delete the object of ``task_id``."""
        self._delete(f"forgetting {task_id}", TASK_KEY_PREFIX + task_id)

    def _delete(self, what: str, key: str) -> None:
        def delete(bucket: storage.Bucket) -> None:
            with contextlib.suppress(gexc.NotFound):  # already gone: nothing to do
                bucket.blob(self.object_name(key)).delete(retry=DEFAULT_RETRY)

        self._run(what, delete)

    # -- groups and counters --------------------------------------------------------------

    def save_group(self, group_id: str, result: Any) -> None:
        """Store (or replace) a group's result tuple."""
        data = self._codec.encode({"result": result})
        name = self.object_name(GROUP_KEY_PREFIX + group_id)
        self._run(f"saving group {group_id}", lambda bucket: self._upload(bucket, name, data))

    def restore_group(self, group_id: str) -> Any | None:
        """The stored group tuple, or ``None``."""
        name = self.object_name(GROUP_KEY_PREFIX + group_id)
        raw = self._run(f"restoring group {group_id}",
                        lambda bucket: self._download(bucket, name))
        if raw is None:
            return None
        meta = self._codec.decode(raw)
        return meta.get("result") if isinstance(meta, dict) else None

    def delete_group(self, group_id: str) -> None:
        """Delete a stored group."""
        self._delete(f"deleting group {group_id}", GROUP_KEY_PREFIX + group_id)

    def incr(self, key: str) -> int:
        """Add one to counter object ``key`` by compare-and-swap on its generation.

        Note: an upload whose response is lost is retried by the client; if the
        lost one had succeeded, the retry loses the swap and counts again, so in
        that rare case one call may count twice (as with the other backends).
        """
        name = self.object_name(key)

        def incr(bucket: storage.Bucket) -> int:
            for attempt in range(MAX_CAS_ATTEMPTS):
                blob = bucket.get_blob(name)
                generation = 0 if blob is None else int(blob.generation)
                value = 1 if blob is None else self._counter_value(blob, generation) + 1
                try:
                    self._upload(bucket, name, str(value).encode(), generation,
                                 {COUNTER_FIELD: str(value)})
                    return value
                except gexc.PreconditionFailed:
                    # Lost the race: back off a little (jittered) and read again.
                    time.sleep(random.uniform(0, min(0.002 * 2**min(attempt, 6), 0.1)))
            raise BackendError(f"counter {name}: too many concurrent updates")

        return self._run(f"incrementing counter {key}", incr)

    def delete_counter(self, key: str) -> None:
        """Delete counter object ``key``."""
        self._delete(f"deleting counter {key}", key)

    @staticmethod
    def _counter_value(blob: storage.Blob, generation: int) -> int:
        value = (blob.metadata or {}).get(COUNTER_FIELD)
        if value is None:  # written by someone else: the content holds it
            value = blob.download_as_bytes(if_generation_match=generation).decode()
        return int(value)

    # -- revoked task ids -----------------------------------------------------------------

    def add_revokes(self, entries: Mapping[str, float]) -> None:
        """Merge the ids into the revoked object by compare-and-swap (none is ever lost)."""
        if entries:
            name = self.object_name(gcs_revokes.REVOKED_OBJECT)
            self._run("recording revoked ids",
                      lambda bucket: gcs_revokes.add(bucket, name, entries))

    def load_revokes(self) -> dict[str, float]:
        """The ids of the revoked object not expired yet."""
        name = self.object_name(gcs_revokes.REVOKED_OBJECT)
        return self._run("loading revoked ids", lambda bucket: gcs_revokes.load(bucket, name))

    def revokes_version(self) -> str | None:
        """The revoked object's generation."""
        name = self.object_name(gcs_revokes.REVOKED_OBJECT)
        return self._run("reading the revoked ids' version",
                         lambda bucket: gcs_revokes.version(bucket, name))

    # -- housekeeping ---------------------------------------------------------------------

    def cleanup(self) -> int:
        """Delete task metas whose ``date_done`` (groups: last update) is older than ``expires``."""
        if self.options.expires is None and self.options.failure_expires is None:
            return 0
        now = datetime.now(UTC)

        def clean(bucket: storage.Bucket) -> int:
            deleted = 0
            for prefix in (TASK_KEY_PREFIX, GROUP_KEY_PREFIX):
                for blob in bucket.client.list_blobs(bucket, prefix=self.object_name(prefix)):
                    if self._expired(blob, prefix, now):
                        try:
                            blob.delete(if_generation_match=blob.generation)
                            deleted += 1
                        except (gexc.NotFound, gexc.PreconditionFailed):
                            pass  # gone or rewritten meanwhile: not ours to delete now
            return deleted

        return self._run("cleaning up expired results", clean)

    def _expired(self, blob: storage.Blob, prefix: str, now: datetime) -> bool:
        if prefix == GROUP_KEY_PREFIX:
            expires = self.options.expires
            return (expires is not None and blob.updated is not None
                    and blob.updated < now - timedelta(seconds=expires))
        try:
            meta = self._codec.decode(blob.download_as_bytes())
            if not isinstance(meta, dict) or not meta.get("date_done"):
                return False
            keep = self.expires_for(str(meta.get("status")))
            done = datetime.fromisoformat(str(meta["date_done"]))
            return keep is not None and done < now - timedelta(seconds=keep)
        except Exception:  # foreign or unreadable objects are not ours to delete
            return False

    def close(self) -> None:
        """Close the client's HTTP session. Idempotent."""
        with self._lock:
            client, self._client, self._bucket = self._client, None, None
        if client is not None:
            client.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} gs://{self.bucket_name}/{self.base_path}>"
