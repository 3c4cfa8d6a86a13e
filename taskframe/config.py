"""``app.conf``: the settings of one app, in layers.

Lookup order, first hit wins:

1. values set in code (``app.conf.update(...)``, ``app.conf.broker_url = ...``),
2. the environment: ``TASKFRAME_BROKER_URL`` and ``TASKFRAME_RESULT_BACKEND``,
3. the configuration source (``config_from_object``), read lazily on first use,
   optionally through a namespace (``namespace="CELERY"`` reads ``CELERY_BROKER_URL``),
4. the defaults in ``taskframe.defaults.DEFAULTS``.

A name that is not a known setting warns once with a did-you-mean.
"""

from __future__ import annotations

import difflib
import importlib
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

from taskframe.defaults import DEFAULTS
from taskframe.errors import ImproperlyConfigured

__all__ = ["ENV_SETTINGS", "Settings", "UnknownSettingWarning"]

#: environment variable -> setting it overrides.
ENV_SETTINGS = {
    "TASKFRAME_BROKER_URL": "broker_url",
    "TASKFRAME_RESULT_BACKEND": "result_backend",
}


class UnknownSettingWarning(UserWarning):
    """Warned when a configuration names a setting taskframe does not know."""


def _warn_unknown(name: str) -> None:
    close = difflib.get_close_matches(name, DEFAULTS.keys(), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    warnings.warn(f"unknown setting {name!r}{hint}", UnknownSettingWarning, stacklevel=4)


class Settings(Mapping[str, Any]):
    """The layered settings of one app; also readable as attributes."""

    def __init__(self, defaults: Mapping[str, Any] | None = None) -> None:
        object.__setattr__(self, "_defaults", dict(DEFAULTS if defaults is None else defaults))
        object.__setattr__(self, "_changes", {})
        object.__setattr__(self, "_source", {})
        object.__setattr__(self, "_pending", None)

    # -- sources ----------------------------------------------------------------------

    def config_from_object(
        self, obj: object | str, *, namespace: str | None = None, silent: bool = False
    ) -> None:
        """Use ``obj`` (an object, a module, or a dotted module path) as the source.

        Nothing is imported until a setting is read. With ``namespace="CELERY"``
        only names like ``CELERY_BROKER_URL`` are read, as ``broker_url``.
        """
        object.__setattr__(self, "_pending", (obj, namespace, silent))
        object.__setattr__(self, "_source", {})

    def _load_pending(self) -> None:
        pending = self._pending
        if pending is None:
            return
        object.__setattr__(self, "_pending", None)
        obj, namespace, silent = pending
        if isinstance(obj, str):
            try:
                obj = _import_object(obj)
            except ImportError as exc:
                if silent:
                    return
                raise ImproperlyConfigured(f"cannot import configuration {obj!r}: {exc}") from exc
        self._source.update(_read_source(obj, namespace))

    def update(self, values: Mapping[str, Any] | None = None, /, **kwargs: Any) -> None:
        """Set several settings in code (highest precedence)."""
        for key, value in {**(values or {}), **kwargs}.items():
            self[key] = value

    def setdefault(self, key: str, value: Any) -> Any:
        """Set ``key`` in code unless it is set anywhere already; return its value."""
        if not self.is_set(key):
            self[key] = value
        return self[key]

    def is_set(self, key: str) -> bool:
        """True when ``key`` was given a value other than its default."""
        self._load_pending()
        return key in self._changes or key in self._source or _env_for(key) is not None

    # -- mapping ----------------------------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        if key in self._changes:
            return self._changes[key]
        env = _env_for(key)
        if env is not None:
            return env
        self._load_pending()
        if key in self._source:
            return self._source[key]
        return self._defaults[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in self._defaults:
            _warn_unknown(key)
        self._changes[key] = value

    def __iter__(self) -> Iterator[str]:
        self._load_pending()
        return iter({**self._defaults, **self._source, **self._changes})

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_"):
            raise AttributeError(key)
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"no setting named {key!r}") from None

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value

    def changes(self) -> dict[str, Any]:
        """Every setting whose value differs from the default (for ``inspect conf``)."""
        return {key: self[key] for key in self if self[key] != self._defaults.get(key)}


def _env_for(key: str) -> str | None:
    for var, setting in ENV_SETTINGS.items():
        if setting == key:
            value = os.environ.get(var)
            if value:
                return value
    return None


def _import_object(path: str) -> object:
    """Import ``pkg.module`` or ``pkg.module:attr`` (or ``pkg.module.attr``)."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        if attr or "." not in module_name:
            raise
        module_name, _, attr = module_name.rpartition(".")
        module = importlib.import_module(module_name)
    return getattr(module, attr) if attr else module


def _read_source(obj: object, namespace: str | None) -> dict[str, Any]:
    items: Mapping[str, Any] = obj if isinstance(obj, Mapping) else {
        name: getattr(obj, name) for name in dir(obj)
    }
    result: dict[str, Any] = {}
    prefix = f"{namespace}_" if namespace else ""
    for name, value in items.items():
        if name.startswith("_"):
            continue
        if prefix:
            if not name.startswith(prefix):
                continue
            key = name[len(prefix):].lower()
        else:
            if name.isupper() and _looks_like_setting(name):
                warnings.warn(
                    f"setting {name!r} ignored: setting names are lower case "
                    f"({_bare(name)!r}); for upper-case prefixed "
                    "names pass namespace='CELERY' (or your prefix)",
                    UnknownSettingWarning, stacklevel=4,
                )
                continue
            if name != name.lower() or callable(value) or _is_module(value):
                continue
            key = name
        if key not in DEFAULTS:
            _warn_unknown(key)
        result[key] = value
    return result


def _bare(name: str) -> str:
    return name.lower().removeprefix("celery_").removeprefix("taskframe_")


def _looks_like_setting(name: str) -> bool:
    lower = name.lower()
    for prefix in ("", "celery_", "taskframe_"):
        if lower.startswith(prefix) and lower[len(prefix):] in DEFAULTS:
            return True
    return lower.startswith(("celery_", "celeryd_", "broker_"))


def _is_module(value: object) -> bool:
    return type(value).__name__ == "module"
