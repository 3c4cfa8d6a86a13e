"""The layout rules `make lint` enforces can see a violation (they are not vacuous).

tools/check_layout.py: import cycles, module and function sizes. setup.cfg's import-linter
contracts: a deliberate upward import breaks the layers contract, an import of the app from
the transport breaks its independence.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _check_layout() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_layout", ROOT / "tools/check_layout.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_cycle_is_found_even_through_a_function_local_import(tmp_path: Path) -> None:
    layout = _check_layout()
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import c\n"  # type-checking imports do not count
        "def late():\n    import a\n"
    )
    (tmp_path / "c.py").write_text("import b\n")
    known = {"a", "b", "c"}
    graph = {name: layout.imports_of(name, tmp_path / f"{name}.py", known) for name in known}
    assert graph["b"] == {"a"}
    assert layout.cycles(graph) == [["a", "b"]]


def test_a_long_function_is_reported(tmp_path: Path) -> None:
    layout = _check_layout()
    body = "\n".join(f"    x{i} = {i}" for i in range(65))
    path = tmp_path / "m.py"
    path.write_text(f"def short():\n    pass\n\n\ndef long():\n{body}\n")
    assert [(name, length) for name, _, length in layout.long_functions(path)] == [("long", 66)]


def test_the_tree_keeps_the_rules() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "tools/check_layout.py")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def _lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    binary = Path(sys.executable).with_name("lint-imports")
    assert binary.exists(), "import-linter is not installed (the dev extra installs it)"
    return subprocess.run([str(binary), str(ROOT / "setup.cfg")], cwd=tree,
                          env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300)


def _installed_tree(dest: Path) -> Path:
    """The package laid out as installed (transport/ and backends/ inside), copied."""
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "taskframe", dest / "taskframe", ignore=ignore)
    shutil.copytree(ROOT / "transport", dest / "taskframe/transport", ignore=ignore)
    shutil.copytree(ROOT / "backends", dest / "taskframe/backends", ignore=ignore)
    return dest


@pytest.mark.slow
def test_an_upward_import_breaks_the_layers_contract(tmp_path: Path) -> None:
    tree = _installed_tree(tmp_path)
    kept = _lint_imports(tree)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    with (tree / "taskframe/result/group.py").open("a") as module:
        module.write("\n\ndef _upward() -> None:\n    from taskframe.client.app import Taskframe\n")
    with (tree / "taskframe/transport/entities.py").open("a") as module:
        module.write("\nimport taskframe.errors\n")
    broken = _lint_imports(tree)
    assert broken.returncode == 1, broken.stdout
    assert "taskframe.result.group -> taskframe.client.app" in broken.stdout
    assert "taskframe.transport.entities -> taskframe.errors" in broken.stdout
