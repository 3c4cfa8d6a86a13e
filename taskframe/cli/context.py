"""What every command shares: the app that ``-A`` names, exit codes, one-line failures."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, NoReturn

import click

from taskframe.client.app import Taskframe
from taskframe.errors import ImproperlyConfigured

__all__ = ["EX_FAILURE", "EX_OK", "EX_TEMPFAIL", "EX_UNAVAILABLE", "EX_USAGE", "Context",
           "fail", "find_app", "pass_ctx", "split_names"]

EX_OK = 0
EX_FAILURE = 1
EX_USAGE = 64
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75


def fail(message: str, code: int = EX_USAGE) -> NoReturn:
    """Print ``message`` as one line on stderr and exit with ``code``."""
    click.echo(f"Error: {' '.join(message.split())}", err=True)
    sys.exit(code)


def find_app(spec: str) -> Taskframe:
    """Resolve ``-A``: ``proj``, ``proj.app``, ``proj:app`` or ``proj:create_app`` (a factory)."""
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not module_name.startswith(exc.name):
            raise
        if attr or "." not in module_name:
            raise ImproperlyConfigured(
                f"cannot import module {module_name!r} (-A {spec})") from exc
        parent, _, attr = module_name.rpartition(".")
        module = importlib.import_module(parent)
    if attr:
        try:
            found = getattr(module, attr)
        except AttributeError:
            raise ImproperlyConfigured(f"module {module.__name__!r} has no {attr!r}") from None
    else:
        found = _app_in_module(module)
    if not isinstance(found, Taskframe) and callable(found):
        found = found()
    if not isinstance(found, Taskframe):
        raise ImproperlyConfigured(f"-A {spec}: {found!r} is not a taskframe app")
    return found


def _app_in_module(module: Any) -> Any:
    for name in ("app", "taskframe", "celery"):
        candidate = getattr(module, name, None)
        if isinstance(candidate, Taskframe):
            return candidate
    apps = [v for v in vars(module).values() if isinstance(v, Taskframe)]
    if len(apps) == 1:
        return apps[0]
    for sub in ("taskframe", "celery", "app"):
        try:
            submodule = importlib.import_module(f"{module.__name__}.{sub}")
        except ModuleNotFoundError:
            continue
        return _app_in_module(submodule)
    raise ImproperlyConfigured(
        f"no app found in module {module.__name__!r}: name it 'app' or pass -A module:name"
    )


class Context:
    """What the group options leave for the subcommands."""

    def __init__(self, app_spec: str | None, broker: str | None, backend: str | None) -> None:
        self.app_spec = app_spec
        self.broker = broker
        self.backend = backend
        self._app: Taskframe | None = None

    @property
    def app(self) -> Taskframe:
        """The app named by ``-A`` (or a bare app when none was given)."""
        if self._app is None:
            try:
                app = find_app(self.app_spec) if self.app_spec else Taskframe("taskframe")
            except ImproperlyConfigured as exc:
                fail(str(exc))
            except ImportError as exc:
                fail(f"cannot import -A {self.app_spec}: {exc}")
            if self.broker:
                app.conf.broker_url = self.broker
            if self.backend:
                app.conf.result_backend = self.backend
            self._app = app
        return self._app


pass_ctx = click.make_pass_decorator(Context)


def split_names(value: str | None) -> list[str] | None:
    if not value:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]
