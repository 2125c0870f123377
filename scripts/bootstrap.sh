#!/usr/bin/env bash
# Create .venv (Python >= 3.12) with torch, megatron-core and this package; idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  PY=${PYTHON:-}
  if [ -z "$PY" ]; then
    for cand in python3.12 python3.13 python3; do
      if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
        PY=$(command -v "$cand"); break
      fi
    done
  fi
  if [ -z "$PY" ] && command -v pyenv >/dev/null 2>&1; then
    for cand in "$(pyenv root)"/versions/3.12.*/bin/python; do
      [ -x "$cand" ] && PY=$cand  # glob order: the last 3.12.x wins
    done
  fi
  if [ -z "$PY" ]; then
    echo "error: Python >= 3.12 not found (megatron-core >= 0.17 needs it); set PYTHON=/path/to/python3.12" >&2
    exit 1
  fi
  echo "bootstrap: creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -m pip install -q -e ".[test,demo]" 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -c "import torch, megatron.core, megatron_default_moe" 2>/dev/null \
  || { echo "error: install failed (torch / megatron-core / megatron_default_moe not importable)" >&2; exit 1; }
