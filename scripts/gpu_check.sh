#!/usr/bin/env bash
# The GPU check of issue 11, one command on a GPU machine without network (CUDA, PyTorch and a
# system python present; everything else from wheels/, fetched beforehand by scripts/gpu_wheels.sh).
#
#   bash scripts/gpu_check.sh [OUT_DIR]     # default: $OUT (the device tool's folder), else out/gpu_check
#
# Within BUDGET_S (450 s, inside the 8 minutes) it, most important first:
#   1. records the machine (python, torch, CUDA, GPU);
#   2. installs megatron-core 0.19.2 (and pytest, numpy, psutil where missing) from wheels/ into a
#      private --target folder on PYTHONPATH: no venv, no network, the system's torch untouched;
#   2b. runs the users' correctness check first, exactly as they would (docs/check.md): torchrun -m megatron_default_moe.check on one GPU (NCCL, Triton kernels, TE
#      grouped experts if TE imports), fp32 and then bf16: the layouts that fit one rank, every
#      router family, dispatcher and update mode against its own one-rank reference;
#   3. runs tests/test_fused.py on the GPU: the fused ops' Triton kernels against their references;
#   3b. runs examples/benchmark_cost.py on CUDA at the three shapes: the op counts, plus CUDA-event
#      times and torch.cuda.max_memory_allocated of TopK vs Default MoE at 16,384 tokens;
#   4. runs examples/benchmark_scale.py on those layer times, and the cost benchmark again at
#      --stats-stride 4 (the routed-row EMA thinned: the opt-in cheap setting, docs/cost.md);
#   5. runs the layer and distributed-free tests as they are built (CPU shim, GPU hidden), and
#      the layer tests again with the GPU visible (informational: the suite is CPU by construction);
#   6. writes everything into OUT_DIR/gpu_check.json (plus the logs beside it).
# Every step has its own timeout and the whole run a budget (BUDGET_S, default 450 s); a failing
# step is recorded and the next one still runs. The exit status is that of the cost benchmark.
# COST_ARGS (extra benchmark_cost.py flags, e.g. "--shapes paper-8c1") and TESTS (test files)
# narrow a run; PYTHON picks the interpreter (default: python3 or python, whichever imports torch).
# shellcheck disable=SC2317  # the functions run through run_step's `bash -c`, which shellcheck cannot follow
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
OUT_DIR=${1:-${OUT:-$ROOT/out/gpu_check}}
WHEELS=${WHEELS_DIR:-$ROOT/wheels}
# the interpreter that has torch: $PYTHON, else the first of python3 / python that imports it
PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
  for candidate in python3 python; do
    if "$candidate" -c "import torch" >/dev/null 2>&1; then PY=$candidate && break; fi
  done
  PY=${PY:-python3}
fi
BUDGET_S=${BUDGET_S:-450}
SITE=${GPU_CHECK_SITE:-${TMPDIR:-/tmp}/megatron-default-moe-gpu-site}
mkdir -p "$OUT_DIR" "$SITE"
STEPS="$OUT_DIR/steps.tsv"
: >"$STEPS"
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONWARNINGS=ignore

# run_step NAME TIMEOUT_S COMMAND...: run with a timeout inside the budget, log, record rc and seconds.
run_step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET_S - SECONDS))
  if ((left < 20)); then
    printf '%s\t%s\t%s\n' "$name" skipped 0 >>"$STEPS"
    echo "== $name: skipped, budget spent"
    return 0
  fi
  ((limit > left)) && limit=$left
  echo "== $name (at most ${limit}s)"
  local start=$SECONDS rc=0
  # through bash, so that a step may be one of the functions below (exported)
  timeout --kill-after=10 "$limit" bash -c '"$@"' step "$@" >"$OUT_DIR/$name.log" 2>&1 || rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >>"$STEPS"
  tail -n 5 "$OUT_DIR/$name.log"
  return "$rc"
}

machine() {
  "$PY" - <<'EOF'
import json, platform, sys
info = {"python": sys.version.split()[0], "platform": platform.platform()}
try:
    import torch
    info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(), gpu_memory=torch.cuda.get_device_properties(0).total_memory)
except Exception as err:  # torch missing is itself the finding
    info["torch_error"] = repr(err)
print(json.dumps(info))
EOF
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
}

# install: megatron-core always; the rest only if the system python lacks it.
install_wheels() {
  local pyver wanted=("megatron-core==0.19.2") module dist
  pyver=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
  shopt -s nullglob
  local found=("$WHEELS"/megatron_core-0.19.2-cp"$pyver"-*.whl)
  if ((${#found[@]} == 0)); then
    echo "no megatron-core 0.19.2 wheel for cp$pyver in $WHEELS (it ships cp312, cp313): run scripts/gpu_wheels.sh ${pyver:0:1}.${pyver:1}"
    return 3
  fi
  for pair in numpy:numpy psutil:psutil pytest:pytest pluggy:pluggy iniconfig:iniconfig packaging:packaging pygments:pygments; do
    module=${pair%%:*} dist=${pair#*:}
    "$PY" -c "import $module" 2>/dev/null || wanted+=("$dist")
  done
  echo "installing into $SITE: ${wanted[*]}"
  if "$PY" -m pip --version >/dev/null 2>&1; then
    "$PY" -m pip install --quiet --no-index --no-deps --find-links "$WHEELS" --target "$SITE" --upgrade "${wanted[@]}"
  else  # no pip: a wheel is a zip archive laid out for site-packages
    local name files
    for name in "${wanted[@]}"; do
      name=${name%%==*}
      name=${name//-/_}
      files=("$WHEELS"/"$name"-*-cp"$pyver"-*.whl "$WHEELS"/"$name"-*-py3-none-any.whl "$WHEELS"/"$name"-*abi3*.whl)
      ((${#files[@]} > 0)) || { echo "no wheel for $name"; return 4; }
      "$PY" -m zipfile -e "${files[0]}" "$SITE"
    done
  fi
  "$PY" -c "import megatron.core, megatron_default_moe, pytest; print('megatron-core', megatron.core.__version__)"
}

export -f machine install_wheels
export PY SITE WHEELS

LAYER_TESTS=(tests/test_functional.py tests/test_layer.py tests/test_spec.py)
COST_TESTS=(tests/test_benchmark_cost.py tests/test_benchmark_scale.py)

run_step machine 30 machine
run_step install 60 install_wheels
# the correctness check users run on their cluster, first: one process on this GPU (one rank),
# fp32 (the strict comparison), then bf16 (against the stock baseline up to the first routing flip, bit-identity throughout)
run_step check 150 "$PY" -m torch.distributed.run --nproc-per-node 1 --master-port 29533 \
  -m megatron_default_moe.check
run_step check_bf16 120 "$PY" -m torch.distributed.run --nproc-per-node 1 --master-port 29534 \
  -m megatron_default_moe.check --dtype bf16
# the fused ops' Triton kernels against their torch references, on the GPU (first: new code)
run_step fused 90 "$PY" -m pytest -q -p no:cacheprovider --junitxml="$OUT_DIR/tests_fused.xml" tests/test_fused.py
if [[ -n "${TESTS:-}" ]]; then read -r -a LAYER_TESTS <<<"$TESTS" && COST_TESTS=(); fi
read -r -a cost_args <<<"${COST_ARGS:-}"
cost_rc=0
run_step cost 270 "$PY" examples/benchmark_cost.py --gpu h200 --max-expert-gb 48 --json "$OUT_DIR/cost.json" \
  "${cost_args[@]}" || cost_rc=$?
if [[ -f "$OUT_DIR/cost.json" ]]; then
  run_step scale 30 "$PY" examples/benchmark_scale.py --cost-json "$OUT_DIR/cost.json" --json "$OUT_DIR/scale.json"
fi
# the routed-row EMA thinned to every 4th row (opt-in; the defaults run probes and the fit)
if [[ -z "${COST_ARGS:-}" ]]; then
  run_step cost_stride4 150 "$PY" examples/benchmark_cost.py --gpu h200 --max-expert-gb 48 --stats-stride 4 \
    --shapes qwen3-30b-a3b,deepseek-v3 --json "$OUT_DIR/cost_stride4.json"
fi

run_step tests_cpu 150 env CUDA_VISIBLE_DEVICES="" "$PY" -m pytest -q -p no:cacheprovider \
  --junitxml="$OUT_DIR/tests_cpu.xml" "${LAYER_TESTS[@]}" "${COST_TESTS[@]}"
run_step tests_gpu_visible 90 "$PY" -m pytest -q -p no:cacheprovider --junitxml="$OUT_DIR/tests_gpu_visible.xml" \
  "${LAYER_TESTS[@]}"
# Megatron-Bridge smoke (megatron_default_moe.bridge, README "Megatron-Bridge"): offline, from
# wheels/bridge/ (fetch beside the others: pip download --no-deps -d wheels/bridge -r
# tests/bridge/requirements.txt), installed --no-deps into $SITE, then tests/test_bridge.py with the
# GPU hidden (on this machine's torch, and with its Transformer Engine if it has one). Skipped, and
# said, without those wheels. Bridge's pretrain() on GPUs is a recipe run, outside this check.
bridge_smoke() {
  shopt -s nullglob
  local wheels=("$WHEELS"/bridge/*.whl)
  if ((${#wheels[@]} == 0)); then
    echo "skipped: no wheels in $WHEELS/bridge (see scripts/gpu_check.sh, Megatron-Bridge smoke)"
    return 0
  fi
  "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" --find-links "$WHEELS/bridge" \
    -r tests/bridge/requirements.txt || return 5
  env CUDA_VISIBLE_DEVICES="" "$PY" -m pytest -q -p no:cacheprovider \
    --junitxml="$OUT_DIR/tests_bridge.xml" tests/test_bridge.py
}
export -f bridge_smoke
run_step bridge 150 bridge_smoke
"$PY" - "$OUT_DIR" <<'EOF'
import json, os, sys, xml.etree.ElementTree as ET
out = sys.argv[1]
def read(name, limit=4000):
    path = os.path.join(out, name)
    return open(path, errors="replace").read()[-limit:] if os.path.exists(path) else None
def load(name):
    path = os.path.join(out, name)
    return json.load(open(path)) if os.path.exists(path) else None
def junit(name):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return None
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} | {"failed": failed}
steps = [dict(zip(("name", "rc", "seconds"), line.rstrip("\n").split("\t")))
         for line in open(os.path.join(out, "steps.tsv"))]
machine_log = read("machine.log") or ""
report = dict(
    machine=next((json.loads(l) for l in machine_log.splitlines() if l.startswith("{")), None),
    nvidia_smi=[l for l in machine_log.splitlines() if not l.startswith("{")],
    steps=[dict(s, log_tail=read(f"{s['name']}.log")) for s in steps],
    tests_fused=junit("tests_fused.xml"), tests_cpu=junit("tests_cpu.xml"),
    tests_gpu_visible=junit("tests_gpu_visible.xml"),
    cost=load("cost.json"), scale=load("scale.json"), cost_stride4=load("cost_stride4.json"),
)
with open(os.path.join(out, "gpu_check.json"), "w") as f:
    json.dump(report, f, indent=1, default=str)
print("wrote", os.path.join(out, "gpu_check.json"))
EOF
exit "$cost_rc"
