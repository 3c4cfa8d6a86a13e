"""Check the shape of the code: no import cycles, no module over 500 lines, no function over 60.

Every ``import`` counts, at module level and inside functions alike (a lazy import that reaches
up a layer is still a dependency); imports under ``if TYPE_CHECKING:`` do not, as they never run.
``transport/`` and ``backends/`` are read as ``taskframe.transport`` and ``taskframe.backends``,
as installed.

Usage: ``python tools/check_layout.py [--graph]``; exits 1 and says why when a rule is broken.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"taskframe": ROOT / "taskframe", "taskframe.transport": ROOT / "transport",
            "taskframe.backends": ROOT / "backends"}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    found: dict[str, Path] = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "taskframe" and parts[:1] in (["transport"], ["backends"]):
                continue
            found[name] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """All nodes but those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project's modules that module ``name`` imports at run time."""
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    targets: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - node.level + 1]
                module = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            candidates = [f"{module}.{alias.name}" for alias in node.names] + [module]
        else:
            continue
        for candidate in candidates:
            # "from taskframe.x import y": y is a module of its own, or a name in x.
            while candidate and candidate not in known:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
                break
    return targets


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def long_functions(path: Path) -> Iterator[tuple[str, int, int]]:
    """(name, first line, length) of each function longer than the limit."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            length = (node.end_lineno or node.lineno) - first + 1
            if length > MAX_FUNCTION_LINES:
                yield node.name, node.lineno, length


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graph", action="store_true", help="print each module's imports")
    args = parser.parse_args()
    found = modules()
    graph = {name: imports_of(name, path, set(found)) for name, path in found.items()}
    if args.graph:
        for name in sorted(graph):
            print(name, "->", ", ".join(sorted(graph[name])))
    problems: list[str] = []
    for component in cycles(graph):
        problems.append("import cycle: " + " <-> ".join(component))
    for path in found.values():
        lines = len(path.read_text().splitlines())
        rel = path.relative_to(ROOT)
        if lines > MAX_MODULE_LINES:
            problems.append(f"{rel}: {lines} lines (limit {MAX_MODULE_LINES})")
        for function, lineno, length in long_functions(path):
            problems.append(
                f"{rel}:{lineno}: {function}() is {length} lines (limit {MAX_FUNCTION_LINES})"
            )
    for problem in problems:
        print(problem)
    print(f"check_layout: {len(found)} modules, {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
