"""The CLI: help, version, one-line errors, call/result/purge on the memory broker."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import taskframe
from taskframe.cli.main import EX_USAGE, find_app, main
from taskframe.errors import ImproperlyConfigured
from taskframe.log import setup_logging


def test_version() -> None:
    out = CliRunner().invoke(main, ["--version"])
    assert out.exit_code == 0
    assert taskframe.__version__ in out.output


@pytest.mark.parametrize("command", ["worker", "call", "result", "purge"])
def test_every_command_has_help(command: str) -> None:
    out = CliRunner().invoke(main, [command, "--help"])
    assert out.exit_code == 0
    assert "Usage:" in out.output and len(out.output.splitlines()) > 3


def test_missing_app_module_is_one_line_and_non_zero(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "taskframe", "-A", "no_such_proj_module", "call", "x"],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )
    assert proc.returncode == EX_USAGE
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "no_such_proj_module" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_json_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = CliRunner().invoke(main, ["-b", "memory://cli-json", "call", "t", "--args", "{oops"])
    assert out.exit_code == EX_USAGE
    assert "--args is not valid JSON" in out.output


def _write_proj(tmp_path: Path, name: str, body: str) -> None:
    (tmp_path / f"{name}.py").write_text(body)


APP_SRC = """
from taskframe import Taskframe
app = Taskframe("{name}", broker="memory://{name}", backend="memory://")

def create_app():
    return app
"""


@pytest.mark.parametrize("form", ["{m}", "{m}.app", "{m}:app", "{m}:create_app"])
def test_find_app_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, form: str) -> None:
    name = f"cliproj_{abs(hash(form))}"
    _write_proj(tmp_path, name, APP_SRC.format(name=name))
    monkeypatch.syspath_prepend(str(tmp_path))
    app = find_app(form.format(m=name))
    assert app.main == name


def test_find_app_rejects_non_apps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_proj(tmp_path, "cliproj_noapp", "x = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImproperlyConfigured, match="no app found"):
        find_app("cliproj_noapp")
    with pytest.raises(ImproperlyConfigured, match="not a taskframe app"):
        find_app("cliproj_noapp:x")


def test_call_then_purge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    with pytest.warns(RuntimeWarning, match="no result_backend is configured"):
        out = runner.invoke(main, ["-b", "memory://cli-purge", "call", "some.task", "--args",
                                   "[1, 2]"])
    assert out.exit_code == 0, out.output
    task_id = out.output.strip().splitlines()[-1]
    assert len(task_id) == 36
    out = runner.invoke(main, ["-b", "memory://cli-purge", "purge", "-f"])
    assert out.exit_code == 0, out.output
    assert "Purged 1 message from 1 queue." in out.output


def test_hijack_false_leaves_the_root_logger_alone() -> None:
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    handler = setup_logging("DEBUG", hijack_root=False)
    try:
        assert (list(root.handlers), root.level) == before
        assert handler in logging.getLogger("taskframe").handlers
    finally:
        logging.getLogger("taskframe").removeHandler(handler)
        logging.getLogger("taskframe").propagate = True


def test_worker_exits_non_zero_when_the_broker_is_unreachable(tmp_path: Path) -> None:
    (tmp_path / "unreachable_proj.py").write_text(
        "from taskframe import Taskframe\n"
        "app = Taskframe('u', broker='sqla+postgresql://postgres@127.0.0.1:1/test')\n"
        "app.conf.broker_connection_max_retries = 1\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "taskframe", "-A", "unreachable_proj", "worker", "-P", "solo"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 69, proc.stderr
    assert "Cannot connect to the broker" in proc.stderr
    assert "Giving up" in proc.stderr


def test_result_prints_a_failure_as_one_line(tmp_path: Path) -> None:
    (tmp_path / "failproj.py").write_text(
        "from taskframe import Taskframe\n"
        "app = Taskframe('f', broker='memory://failproj', backend='memory://')\n"
        "app.conf.task_always_eager = True\n"
        "@app.task\n"
        "def boom():\n"
        "    raise ValueError('bad input')\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        import failproj

        handle = failproj.app.backend.mark_as_failure("abc", ValueError("bad input"))
        assert handle["status"] == "FAILURE"
        out = CliRunner().invoke(main, ["-A", "failproj", "result", "abc"])
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("failproj", None)
    assert out.exit_code == 1
    assert out.output.strip() == "ValueError: bad input"
    assert "Traceback" not in out.output


def test_cleanup_command(tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite3"
    out = CliRunner().invoke(main, ["-b", "memory://cleanup", "--result-backend",
                                    f"db+sqlite:///{db}", "cleanup"])
    assert out.exit_code == 0, out.output
    assert out.output.startswith("Deleted 0 expired results")


def test_unavailable_pools_are_refused_by_the_parser() -> None:
    out = CliRunner().invoke(main, ["worker", "-P", "nonesuch"])
    assert out.exit_code == 2
    assert "nonesuch" in out.output


def test_call_with_an_unreachable_broker_gives_up_fast_with_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "taskframe", "-b", "sqla+postgresql://postgres@127.0.0.1:1/test",
         "call", "some.task"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 69
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("Error: BrokerConnectionError:")
    assert "4 attempt(s)" in proc.stderr  # task_publish_retry_policy: 3 retries
