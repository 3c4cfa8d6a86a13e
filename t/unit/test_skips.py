"""No test skips around ``TASKFRAME_REQUIRE_SERVICES``: ``services`` is the only way to skip.

``services.require_service``/``require_module``/``unavailable`` skip loudly, or fail when
``TASKFRAME_REQUIRE_SERVICES=1``, so CI never passes by skipping. A ``pytest.skip``,
``skipif`` or ``importorskip`` anywhere else under ``t/`` would skip in CI too.
"""

from __future__ import annotations

import ast
from pathlib import Path

T = Path(__file__).resolve().parents[1]
ALLOWED = {T / "services.py"}
BYPASSES = {"skip", "skipif", "importorskip", "skipTest"}


def bypasses(path: Path) -> list[str]:
    """``file:line name`` for each skip that does not go through ``services``."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in BYPASSES:
            found.append(f"{path}:{node.lineno} {node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module in ("pytest", "unittest"):
            found += [f"{path}:{node.lineno} {a.name}" for a in node.names
                      if a.name in BYPASSES]
    return found


def test_no_test_skips_except_through_services() -> None:
    found = [hit for path in sorted(T.rglob("*.py")) if path not in ALLOWED
             for hit in bypasses(path)]
    assert found == [], "skip through services.unavailable/require_module instead:\n" \
        + "\n".join(found)


def test_the_scan_sees_each_kind_of_bypass(tmp_path: Path) -> None:
    sample = tmp_path / "test_sample.py"
    sample.write_text(
        "import pytest\n"
        "from pytest import importorskip\n"
        "kombu = pytest.importorskip('kombu')\n"
        "@pytest.mark.skipif(True, reason='x')\n"
        "def test_a():\n"
        "    pytest.skip('down')\n"
    )
    assert sorted(hit.split()[-1] for hit in bypasses(sample)) == [
        "importorskip", "importorskip", "skip", "skipif"]
