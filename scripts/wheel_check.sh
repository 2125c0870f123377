#!/usr/bin/env bash
# The package as a user gets it: build the sdist and, from it, the wheel; check that both hold every
# file of `git ls-files megatron_default_moe`; install the wheel (not editable, --no-deps) into a
# fresh venv that borrows torch, megatron-core, numpy ... from .venv through a .pth line; from a
# directory outside the repository run `python -m megatron_default_moe.check --layouts dp` (one
# process, CPU) and scripts/wheel_smoke.py (DefaultMoELayer forward + backward), asserting that
# megatron_default_moe comes from the wheel. Needs .venv (`make venv`) and PyPI for setuptools.
# Prints "wheel_check: PASS" or "wheel_check: FAIL ..." last; exits non-zero on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PY:-$ROOT/.venv/bin/python}
START=$(date +%s)

TMP=$(mktemp -d "${TMPDIR:-/tmp}/wheel_check.XXXXXX")
cleanup() { rm -rf "$TMP"; }
trap cleanup EXIT

fail() {
  echo "wheel_check: FAIL: $*"
  exit 1
}

# run LOG CMD...: CMD's output to $TMP/LOG; on failure its last lines and FAIL.
run() {
  local log=$TMP/$1
  shift
  if ! "$@" >"$log" 2>&1; then
    grep -v "Warning: \|warnings.warn(" "$log" | tail -25
    fail "$* failed (its last lines above)"
  fi
}

[ -x "$PY" ] || fail "$PY not found (run \`make venv\` first)"
git rev-parse --git-dir >/dev/null 2>&1 || fail "not a git checkout (the file list comes from git)"

# The source tree as git sees it (tracked and new files, no ignored build/, *.egg-info or caches),
# so that nothing left in the checkout leaks into the archives.
echo "wheel_check: copying the source tree"
mkdir -p "$TMP/src"
git ls-files -z --cached --others --exclude-standard \
  | while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done \
  | tar --null -T - -cf - | tar -xf - -C "$TMP/src"

"$PY" -c "import build" 2>/dev/null || run pip_build.log "$PY" -m pip install -q build
echo "wheel_check: building the sdist, then the wheel from it"
run build.log "$PY" -m build --outdir "$TMP/dist" "$TMP/src"
SDISTS=("$TMP"/dist/*.tar.gz)
WHEELS=("$TMP"/dist/*.whl)
if [ ${#SDISTS[@]} != 1 ] || [ ! -f "${SDISTS[0]}" ] || [ ${#WHEELS[@]} != 1 ] || [ ! -f "${WHEELS[0]}" ]; then
  fail "expected one sdist and one wheel, got: $(ls "$TMP/dist")"
fi
echo "wheel_check: built $(basename "${SDISTS[0]}") and $(basename "${WHEELS[0]}")"

# Every file of the package in both archives; nothing else at the wheel's top level.
"$PY" - "$TMP/src" "${SDISTS[0]}" "${WHEELS[0]}" <<'EOF' || fail "sdist or wheel contents wrong (listed above)"
import os, sys, tarfile, zipfile

src, sdist, wheel = sys.argv[1:]
expected = sorted(
    os.path.relpath(os.path.join(d, f), src)
    for d, _, files in os.walk(os.path.join(src, "megatron_default_moe"))
    for f in files
)
with tarfile.open(sdist) as tar:
    in_sdist = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
with zipfile.ZipFile(wheel) as zf:
    in_wheel = set(zf.namelist())
version = os.path.basename(wheel).split("-")[1]
dist_info = f"megatron_default_moe-{version}.dist-info/"
problems = [f"missing from the sdist: {f}" for f in expected + ["pyproject.toml", "README.md", "LICENSE"]
            if f not in in_sdist]
problems += [f"missing from the wheel: {f}" for f in expected if f not in in_wheel]
problems += [f"missing from the wheel: {dist_info}licenses/LICENSE"] * (dist_info + "licenses/LICENSE" not in in_wheel)
problems += [f"in the wheel but not the package: {f}" for f in sorted(in_wheel)
             if not f.startswith(("megatron_default_moe/", dist_info)) or "__pycache__" in f or f.endswith(".pyc")]
for p in problems:
    print("FAIL", p)
if not problems:
    print(f"wheel_check: all {len(expected)} package files in the sdist and the wheel")
sys.exit(1 if problems else 0)
EOF

# A fresh venv with the wheel alone; the heavy dependencies come from .venv's site-packages by a
# path line (not processed as a site dir: .venv's editable-install finder stays inactive).
BASE=$("$PY" -c "import sys; print(sys._base_executable)")
run venv.log "$BASE" -m venv --without-pip "$TMP/venv"
VPY=$TMP/venv/bin/python
run install.log "$PY" -m pip --python "$VPY" install -q --no-deps --no-index "${WHEELS[0]}"
SITE=$("$VPY" -c "import sysconfig; print(sysconfig.get_path('purelib'))")
"$PY" -c "import sysconfig; print(sysconfig.get_path('purelib'))" >"$SITE/zz_wheel_check_deps.pth"

cd "$TMP"  # not the repository: its source tree must not shadow the wheel
export PYTHONWARNINGS=ignore PYTHONNOUSERSITE=1
unset PYTHONPATH
echo "wheel_check: from the wheel in a fresh venv: scripts/wheel_smoke.py (one layer forward + backward)"
cp "$ROOT/scripts/wheel_smoke.py" "$TMP/"
run smoke.log "$VPY" wheel_smoke.py --expect-under "$SITE"
grep "^megatron_default_moe \|^layer forward" smoke.log
WHEEL_VERSION=$(basename "${WHEELS[0]}" | cut -d- -f2)
grep -q "^megatron_default_moe $WHEEL_VERSION from " smoke.log \
  || fail "megatron_default_moe.__version__ is not the wheel's $WHEEL_VERSION (pyproject.toml's version)"
echo "wheel_check: from the wheel in a fresh venv: python -m megatron_default_moe.check --layouts dp"
run check.log "$VPY" -m megatron_default_moe.check --layouts dp
grep "^PASSED" check.log
echo "wheel_check: PASS ($(basename "${WHEELS[0]}"), $(($(date +%s) - START)) s)"
