"""The Celery wire format, translated in one place.

``taskframe.protocol`` is pure data: task messages (``encode_task`` /
``decode_task``), result metas and exception encoding (task states are the core's
``taskframe.states``). The rest of taskframe sees ``TaskMessage`` and ``ResultMeta``,
never wire dicts.
"""

from __future__ import annotations

from taskframe.protocol.message import TaskMessage
from taskframe.protocol.results import (
    ResultContext,
    ResultMeta,
    decode_exception,
    decode_result,
    encode_exception,
    flatten_ids,
    group_tuple,
    make_meta,
    result_tuple,
)
from taskframe.protocol.task import decode_message, decode_task, encode_task, safe_repr

__all__ = [
    "ResultContext",
    "ResultMeta",
    "TaskMessage",
    "decode_exception",
    "decode_message",
    "decode_result",
    "decode_task",
    "encode_exception",
    "encode_task",
    "flatten_ids",
    "group_tuple",
    "make_meta",
    "result_tuple",
    "safe_repr",
]
