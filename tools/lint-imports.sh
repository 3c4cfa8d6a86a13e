#!/usr/bin/env bash
# Check the import-linter contracts in setup.cfg. transport/ and backends/ are mapped into
# taskframe/ by package-dir, which import-linter cannot follow through the editable install:
# lay the package out as installed (a tree of symlinks) and check that.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=build/lint-imports
rm -rf "$tree"
mkdir -p "$tree"
cp -rs "$PWD/taskframe" "$tree/taskframe"
cp -rs "$PWD/transport" "$tree/taskframe/transport"
cp -rs "$PWD/backends" "$tree/taskframe/backends"
find "$tree" -name __pycache__ -prune -exec rm -rf {} +
cd "$tree"
PYTHONPATH=. exec "${LINT_IMPORTS:-$OLDPWD/.venv/bin/lint-imports}" "$OLDPWD/setup.cfg" "$@"
