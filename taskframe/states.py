"""Task states with Celery's names (``from taskframe import states``, as ``celery.states``)."""

from taskframe.protocol.states import *  # noqa: F403 - a re-export by design
from taskframe.protocol.states import __all__ as __all__
