"""``Task`` is generic over the function's parameters: mypy rejects ``add.delay("x")``."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import services

api = services.require_module("mypy.api")

ROOT = Path(__file__).resolve().parents[2]

SNIPPET = textwrap.dedent('''\
    from taskframe import Taskframe

    app = Taskframe("typing")

    @app.task
    def add(a: int, b: int) -> int:
        return a + b

    @app.task(bind=True)
    def bound(self, a: int) -> str:
        return str(a)

    ok: int = add(1, 2)
    add.delay(1, 2)
    bound.delay(1)
    add.delay("x", 2)  # line 16: error expected
    bound.delay("x")  # line 17: error expected
    wrong: str = add(1, 2)  # line 18: error expected
''')


def _package_tree(tmp: Path) -> Path:
    """The installed layout (transport/ and backends/ inside taskframe/), as symlinks."""
    tree = tmp / "tree"
    pkg = tree / "taskframe"
    pkg.mkdir(parents=True)
    for entry in (ROOT / "taskframe").iterdir():
        (pkg / entry.name).symlink_to(entry)
    (pkg / "transport").symlink_to(ROOT / "transport")
    (pkg / "backends").symlink_to(ROOT / "backends")
    return tree


def test_delay_arguments_are_type_checked(tmp_path: Path) -> None:
    tree = _package_tree(tmp_path)
    snippet = tmp_path / "snippet.py"
    snippet.write_text(SNIPPET)
    env_path = os.environ.get("MYPYPATH")
    os.environ["MYPYPATH"] = str(tree)
    try:
        stdout, stderr, _ = api.run([str(snippet), "--no-incremental", "--follow-imports=silent",
                                     "--ignore-missing-imports", "--cache-dir", os.devnull,
                                     "--config-file", os.devnull])
    finally:
        if env_path is None:
            os.environ.pop("MYPYPATH", None)
        else:
            os.environ["MYPYPATH"] = env_path
    lines = {int(line.split(":")[1]) for line in stdout.splitlines() if ": error:" in line}
    assert lines == {16, 17, 18}, stdout + stderr
