#!/usr/bin/env bash
# mypy cannot follow setuptools' editable-install finder, and transport/ and backends/
# are mapped into taskframe/ by package-dir. Build a tree of symlinks laid out as the
# installed package is, and check that.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=build/typecheck
rm -rf "$tree"
mkdir -p "$tree/taskframe"
for f in taskframe/*; do ln -s "$PWD/$f" "$tree/taskframe/$(basename "$f")"; done
ln -s "$PWD/transport" "$tree/taskframe/transport"
ln -s "$PWD/backends" "$tree/taskframe/backends"
cd "$tree"
exec "${MYPY:-$OLDPWD/.venv/bin/mypy}" --config-file ../../pyproject.toml -p taskframe "$@"
