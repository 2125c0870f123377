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
# Megatron-Bridge (optional; megatron_default_moe.bridge and tests/test_bridge.py): the wheel
# without its hard dependencies, then the pinned ones its conversion path imports (pyproject.toml
# extra "bridge"). A failure is recorded, and only then do the Bridge tests skip.
BRIDGE_FAILED="$VENV/megatron-bridge-install-failed"
rm -f "$BRIDGE_FAILED"
if ! { "$VENV/bin/python" -m pip install -q --no-deps "megatron-bridge==0.6.2" \
       && "$VENV/bin/python" -m pip install -q -e ".[bridge]"; } >"$VENV/megatron-bridge-install.log" 2>&1; then
  tail -5 "$VENV/megatron-bridge-install.log" >"$BRIDGE_FAILED"
  echo "warning: Megatron-Bridge not installed (see $BRIDGE_FAILED); its tests will skip" >&2
fi
