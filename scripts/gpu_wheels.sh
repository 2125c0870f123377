#!/usr/bin/env bash
# Download, on a machine with network, every wheel scripts/gpu_check.sh may need on a GPU machine
# without one (issue 11). The GPU machine is assumed to have CUDA, PyTorch and a system python;
# megatron-core and the test tools travel as wheels in wheels/ (git-ignored; carry it over).
#
#   scripts/gpu_wheels.sh                 # CPython 3.12 and 3.13 (megatron-core 0.19.2 has no others), x86_64
#   scripts/gpu_wheels.sh 3.12            # only these Python versions
#   PLATFORM=manylinux_2_28_aarch64 scripts/gpu_wheels.sh   # a Grace-Hopper machine
#
# Every download is `pip download --no-deps --only-binary=:all:` for an explicit Python version and
# platform, so the files fit the GPU machine, not this one. About 40 MB for two versions.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST=${WHEELS_DIR:-$ROOT/wheels}
PLATFORM=${PLATFORM:-manylinux_2_28_x86_64}
MEGATRON_CORE=${MEGATRON_CORE:-megatron-core==0.19.2}
if [[ -x "$ROOT/.venv/bin/python" ]]; then PY=$ROOT/.venv/bin/python; else PY=${PYTHON:-python3}; fi

if [[ $# -gt 0 ]]; then versions=("$@"); else versions=(3.12 3.13); fi
# Binary wheels, one per Python version: megatron-core; numpy and psutil only if the GPU machine lacks them.
per_version=("$MEGATRON_CORE" numpy psutil)
# Pure-Python test tools (pytest and what it imports), one file for all versions.
pure=(pytest pluggy iniconfig packaging pygments)

mkdir -p "$DEST"
for version in "${versions[@]}"; do
  echo "== CPython $version, $PLATFORM"
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$DEST" \
    --python-version "$version" --implementation cp --platform "$PLATFORM" "${per_version[@]}"
done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$DEST" \
  --python-version "${versions[0]}" --implementation cp --platform "$PLATFORM" "${pure[@]}"

echo "wheels in $DEST ($(du -sh "$DEST" | cut -f1)):"
ls -1 "$DEST"
echo "next, on the GPU machine (wheels/ travels as a carried path): bash scripts/gpu_check.sh [OUT_DIR]"
