"""Result handles: what ``delay()`` returns and how a caller waits for and reads results.

* ``async_result``: ``AsyncResult`` (one task's result, read from the result backend) and
  ``EagerResult`` (a result computed in this process).
* ``group``: ``ResultSet`` and ``GroupResult`` (several results as one), ``result_from_tuple``.

``from taskframe.result import AsyncResult, GroupResult`` works as ``celery.result`` does.
"""

from taskframe.result.async_result import AsyncResult, EagerResult
from taskframe.result.group import GroupResult, ResultSet, result_from_tuple

__all__ = ["AsyncResult", "EagerResult", "GroupResult", "ResultSet", "result_from_tuple"]
