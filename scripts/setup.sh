#!/usr/bin/env bash
# Idempotent set-up: a .venv beside the repo with torch (CPU build) first, then this package.
# Re-runs only when pyproject.toml changed. Needs only python3 (>= 3.10) and pip.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP="$VENV/.dllm-export-setup"
WANT="$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# torch first and pinned: otherwise pip resolves `torch` to a multi-GB CUDA build.
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet -e ".[test]"
echo "$WANT" > "$STAMP"
