"""A GCS emulator for tests: ``gcp-storage-emulator`` in this process, with preconditions.

``start()`` (called by ``backend_url``) runs one emulator per test process on a
free loopback port, creates the bucket ``BUCKET`` and sets ``STORAGE_EMULATOR_HOST``
so the real ``google-cloud-storage`` client (ours, Celery's, spawned children's)
talks to it. It is stopped at exit.

Why the patch: the stock emulator ignores ``ifGenerationMatch``, so every
conditional write would "succeed" and a compare-and-swap counter could not be
tested. ``_PreconditionStorage.create_file`` checks the precondition against the
object's current generation (0 = must not exist) and ``_PreconditionHandler``
answers 412 when it fails. The emulator's HTTP server handles one request at a
time, so the check and the write are atomic, as on real GCS.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import socket
import threading
from functools import partial
from http import HTTPStatus
from http.server import HTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import buckets
from gcp_storage_emulator.server import RequestHandler
from gcp_storage_emulator.storage import Storage

__all__ = ["BUCKET", "backend_url", "delete_base_path", "start"]

BUCKET = "tf-test-results"
PROJECT = "tf-test"
_lock = threading.Lock()
_server: HTTPServer | None = None
_local = threading.local()


class _PreconditionFailed(Exception):
    """Raised by the storage when ``ifGenerationMatch`` does not match."""


class _PreconditionStorage(Storage):  # type: ignore[misc]
    def create_file(self, bucket_name: str, file_name: str, content: Any, file_obj: Any,
                    file_id: Any = None) -> Any:
        expected = getattr(_local, "if_generation_match", None)
        if expected is not None:
            try:
                current = int(self.get_file_obj(bucket_name, file_name)["generation"])
            except NotFound:
                current = 0
            if current != expected:
                raise _PreconditionFailed(f"generation {current} != {expected}")
        return super().create_file(bucket_name, file_name, content, file_obj, file_id)


class _PreconditionHandler(RequestHandler):  # type: ignore[misc]
    def _with_precondition(self, handle: Any) -> None:
        query = parse_qs(urlsplit(self.path).query)
        match = query.get("ifGenerationMatch")
        _local.if_generation_match = int(match[0]) if match else None
        try:
            handle()
        except _PreconditionFailed as exc:
            body = (f'{{"error": {{"code": 412, "message": "{exc}", "errors": '
                    f'[{{"reason": "conditionNotMet", "message": "{exc}"}}]}}}}').encode()
            self.send_response(HTTPStatus.PRECONDITION_FAILED.value)
            self.send_header("Content-type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        finally:
            _local.if_generation_match = None

    def do_POST(self) -> None:
        self._with_precondition(super().do_POST)

    def do_PUT(self) -> None:
        self._with_precondition(super().do_PUT)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request would drown the test output


# The emulator's router logs every handler exception as an ERROR, including the
# expected 412s of compare-and-swap losers: keep test output readable.
logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start() -> str:
    """Start the emulator once per process; return its ``http://host:port``."""
    global _server
    with _lock:
        if _server is None:
            storage = _PreconditionStorage(use_memory_fs=True)
            buckets.create_bucket(BUCKET, storage)
            server = HTTPServer(("127.0.0.1", _free_port()),
                                partial(_PreconditionHandler, storage))
            threading.Thread(target=server.serve_forever, name="gcs-emulator",
                             daemon=True).start()
            atexit.register(server.shutdown)
            _server = server
        host = f"http://127.0.0.1:{_server.server_address[1]}"
        os.environ["STORAGE_EMULATOR_HOST"] = host
        return host


def backend_url(base_path: str) -> str:
    """A ``gs://`` result backend URL under ``base_path`` in the emulator's bucket."""
    start()
    return f"gs://{BUCKET}/{base_path}?gcs_project={PROJECT}"


def delete_base_path(base_path: str) -> int:
    """Delete every object under ``base_path``; return how many."""
    from google.cloud import storage  # type: ignore[attr-defined]

    start()
    client = storage.Client(project=PROJECT)
    deleted = 0
    try:
        for blob in client.list_blobs(BUCKET, prefix=f"{base_path}/"):
            with contextlib.suppress(Exception):
                blob.delete()
                deleted += 1
    finally:
        client.close()
    return deleted
