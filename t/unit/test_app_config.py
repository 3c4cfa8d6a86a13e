"""Settings: layers, namespaces, environment, did-you-mean warnings."""

from __future__ import annotations

import types
import warnings

import pytest

from taskframe import Taskframe
from taskframe.config import Settings, UnknownSettingWarning
from taskframe.defaults import DEFAULTS, EMBEDDED_BACKEND_URL, EMBEDDED_BROKER_URL
from taskframe.errors import ImproperlyConfigured


def test_defaults_are_celerys() -> None:
    conf = Settings()
    assert conf.task_default_queue == "celery"
    assert conf.task_serializer == "json"
    assert conf.accept_content == ["json"]
    assert conf.worker_prefetch_multiplier == 4
    assert conf.result_expires == 86400.0


def test_code_beats_source_beats_defaults() -> None:
    conf = Settings()
    conf.config_from_object({"task_default_queue": "from-source", "result_expires": 5})
    assert conf.task_default_queue == "from-source"
    conf.task_default_queue = "from-code"
    assert conf.task_default_queue == "from-code"
    assert conf.result_expires == 5
    assert conf.is_set("result_expires")
    assert not conf.is_set("task_acks_late")


def test_namespace_reads_prefixed_upper_case_names() -> None:
    source = types.SimpleNamespace(CELERY_BROKER_URL="memory://ns", CELERY_TASK_ACKS_LATE=True,
                                   broker_url="ignored://", OTHER_SETTING=1)
    conf = Settings()
    conf.config_from_object(source, namespace="CELERY")
    assert conf.broker_url == "memory://ns"
    assert conf.task_acks_late is True


def test_module_path_is_imported_lazily(tmp_path: pytest.TempPathFactory, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    pkg = tmp_path / "lazy_settings_mod.py"  # type: ignore[operator]
    pkg.write_text("broker_url = 'memory://lazy'\ntask_track_started = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    conf = Settings()
    conf.config_from_object("lazy_settings_mod")
    assert conf.broker_url == "memory://lazy"
    assert conf.task_track_started is True


def test_missing_module_is_a_clear_error() -> None:
    conf = Settings()
    conf.config_from_object("no_such_settings_module_xyz")
    with pytest.raises(ImproperlyConfigured, match="no_such_settings_module_xyz"):
        _ = conf.broker_url


def test_silent_missing_module() -> None:
    conf = Settings()
    conf.config_from_object("no_such_settings_module_xyz", silent=True)
    assert conf.broker_url is None


def test_unknown_setting_warns_with_did_you_mean() -> None:
    conf = Settings()
    with pytest.warns(UnknownSettingWarning, match="did you mean 'task_acks_late'"):
        conf.task_ack_late = True


def test_environment_overrides_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKFRAME_BROKER_URL", "memory://env")
    conf = Settings()
    conf.config_from_object({"broker_url": "memory://source"})
    assert conf.broker_url == "memory://env"


def test_config_from_envvar(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "envvar_settings_mod.py").write_text("result_expires = 7\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("MY_SETTINGS", "envvar_settings_mod")
    app = Taskframe("t", set_as_current=False)
    assert app.config_from_envvar("MY_SETTINGS")
    assert app.conf.result_expires == 7
    with pytest.raises(ImproperlyConfigured, match="NOT_SET_VAR"):
        app.config_from_envvar("NOT_SET_VAR")


def test_embedded_default_when_no_broker(caplog: pytest.LogCaptureFixture) -> None:
    app = Taskframe("t", set_as_current=False)
    assert app.broker_url == EMBEDDED_BROKER_URL
    assert app.result_backend_url == EMBEDDED_BACKEND_URL
    assert "embedded SQLite" in caplog.text


def test_no_backend_when_broker_is_set() -> None:
    app = Taskframe("t", broker="memory://x", set_as_current=False)
    assert app.result_backend_url is None


def test_every_default_has_a_lowercase_name() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in DEFAULTS:
            assert name == name.lower()


def test_upper_case_settings_without_namespace_warn() -> None:
    conf = Settings()
    conf.config_from_object(types.SimpleNamespace(BROKER_URL="memory://old",
                                                  CELERY_RESULT_BACKEND="db+sqlite:///x"))
    with pytest.warns(UnknownSettingWarning, match="namespace='CELERY'"):
        assert conf.broker_url is None
