#!/usr/bin/env bash
# Parses run.ps1 with the tree-sitter PowerShell grammar (it cannot be run here), after
# installing the PyPI packages tree-sitter and tree-sitter-powershell when missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source packaging/common.sh
header "run.ps1 parses (tree-sitter-powershell)"
PY="$(command -v python3 || true)"
[[ -n "$PY" ]] || { echo "error: python3 is needed to parse run.ps1 (apt-get install python3 python3-pip)" >&2; exit 1; }
if ! "$PY" -c 'import tree_sitter, tree_sitter_powershell' 2>/dev/null; then
  echo "installing tree-sitter and tree-sitter-powershell (PyPI)"
  step "$PY" -m pip install --quiet --disable-pip-version-check tree-sitter tree-sitter-powershell \
    || { echo "error: could not install tree-sitter-powershell from PyPI" >&2; exit 1; }
fi
step "$PY" packaging/check-run-ps1.py run.ps1
