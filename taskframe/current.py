"""The current app: the one ``shared_task``, results and signatures use when given none.

A leaf of the core, so that results and the canvas can find the app without importing the
client API above them. The app registers itself here when it is created with
``set_as_current=True``; when none exists yet, ``current_app()`` asks the factory that the
package's root (``taskframe/__init__.py``, above every layer) installs for a default app.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from taskframe.client.app import Taskframe

__all__ = ["current_app", "set_current_app", "set_default_app_factory"]

_lock = threading.RLock()
_current: Taskframe | None = None
_default_factory: Callable[[], Taskframe] | None = None


def current_app() -> Taskframe:
    """The app created last (or a default app when none exists yet)."""
    with _lock:
        if _current is None:
            if _default_factory is None:  # only if taskframe/__init__.py was bypassed
                raise RuntimeError("no taskframe app exists and no default app factory is set")
            _default_factory()  # the new app makes itself current
        assert _current is not None
        return _current


def set_current_app(app: Taskframe) -> None:
    """Make ``app`` the current app (called by ``Taskframe(set_as_current=True)``)."""
    global _current
    with _lock:
        _current = app


def set_default_app_factory(factory: Callable[[], Taskframe]) -> None:
    """How ``current_app()`` makes an app when none exists yet."""
    global _default_factory
    _default_factory = factory
