"""Real Megatron-LM training iterations of examples/pretrain_gpt_default_moe.py on CPU (mock data).

Needs a Megatron-LM checkout (``pretrain_gpt.py`` is not in the megatron-core wheel): set
``MEGATRON_LM_DIR`` (``git clone --branch core_v0.19.0 https://github.com/NVIDIA/Megatron-LM``);
skipped otherwise. Only the checkout's top-level scripts are used (linked into a temporary
directory), so ``megatron.*`` is the installed megatron-core, as everywhere else in the tests.

On CPU, ``pretrain()`` meets a few CUDA-only calls that the package's shim does not cover
(``initialize_megatron``'s CUDA assert, ``device_count() > 0`` gating model-parallel init, the RNG
tracker, the rerun state machine's ``torch.cuda.get_rng_state``, compiling the dataset helpers
that the wheel ships prebuilt); ``RUNNER`` stands them in before running the script. Gradient
clipping is off (``clip_grad_by_total_norm_fp32`` asserts CUDA tensors).
"""

import json
import os
import re
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY = os.path.join(ROOT, "examples", "pretrain_gpt_default_moe.py")
CHECKOUT = os.environ.get("MEGATRON_LM_DIR")

pytestmark = pytest.mark.skipif(
    not CHECKOUT or not os.path.isfile(os.path.join(CHECKOUT or "", "pretrain_gpt.py")),
    reason="needs a Megatron-LM checkout: set MEGATRON_LM_DIR "
    "(git clone --branch core_v0.19.0 https://github.com/NVIDIA/Megatron-LM)",
)

RUNNER = r'''
import functools, json, os, runpy, sys

sys.path.insert(0, os.environ["MEGATRON_LM_DIR"])
from megatron_default_moe.testing import cpu

cpu.enable()
import torch

torch.cuda.device_count = lambda: 1
torch.cuda.set_device = lambda *a, **k: None
torch.cuda.get_rng_state = lambda *a, **k: torch.zeros(1, dtype=torch.uint8)
torch.cuda.set_rng_state = lambda *a, **k: None
from megatron.core import tensor_parallel

_seed = tensor_parallel.model_parallel_cuda_manual_seed


def _cpu_seed(seed, *args, **kwargs):
    ranks = {k: v for k, v in kwargs.items() if k.endswith("_rank")}
    return _seed(seed, inference_rng_tracker=True, force_reset_rng=True, **ranks)


tensor_parallel.model_parallel_cuda_manual_seed = _cpu_seed
from megatron.core.datasets import utils as dataset_utils

dataset_utils.compile_helpers = lambda: None
from megatron.training import training

training.initialize_megatron = functools.partial(training.initialize_megatron, allow_no_cuda=True)
from megatron_default_moe import metrics

_log = metrics.log_default_moe_metrics


def _log_and_print(model, iteration, *args, **kwargs):
    out = _log(model, iteration, *args, **kwargs)
    print("DEFAULT_MOE_METRICS", iteration, json.dumps(out), flush=True)
    return out


metrics.log_default_moe_metrics = _log_and_print
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
'''

TINY_GPT = [
    "--num-layers", "3", "--hidden-size", "32", "--num-attention-heads", "4",
    "--seq-length", "16", "--max-position-embeddings", "16",
    "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3", "--lr", "1e-3",
    "--lr-decay-style", "constant", "--clip-grad", "0.0", "--log-interval", "1", "--eval-iters", "0", "--eval-interval", "100",
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "64",
    "--num-experts", "4", "--moe-router-topk", "1", "--moe-layer-freq", "([0]+[1]*2)",
    "--moe-router-score-function", "softmax", "--moe-router-pre-softmax",
    "--moe-token-dispatcher-type", "alltoall", "--distributed-backend", "gloo",
    "--transformer-impl", "local", "--no-persist-layer-norm", "--no-gradient-accumulation-fusion",
    "--no-bias-gelu-fusion", "--disable-bias-linear", "--no-masked-softmax-fusion",
    "--no-bias-dropout-fusion", "--no-rope-fusion",
]  # fmt: skip


@pytest.fixture(scope="module")
def scripts_dir(tmp_path_factory):
    """The checkout's top-level scripts only (pretrain_gpt.py imports two of its siblings)."""
    path = tmp_path_factory.mktemp("megatron_lm_scripts")
    for name in ("pretrain_gpt.py", "gpt_builders.py", "model_provider.py"):
        os.symlink(os.path.join(CHECKOUT, name), path / name)
    (path / "runner.py").write_text(RUNNER)
    return path


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(scripts_dir, script, *flags):
    env = dict(
        os.environ,
        MEGATRON_LM_DIR=str(scripts_dir),
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        CUDA_DEVICE_MAX_CONNECTIONS="1",
        PYTHONWARNINGS="ignore",
    )
    result = subprocess.run(
        [sys.executable, str(scripts_dir / "runner.py"), script, *TINY_GPT, *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    losses = re.findall(r"iteration\s+(\d+)/\s*\d+ .*?\| lm loss: (\S+) \|", result.stdout)
    logged = {
        int(step): json.loads(values)
        for step, values in re.findall(r"^DEFAULT_MOE_METRICS (\d+) (.*)$", result.stdout, re.M)
    }
    return [(int(i), float(v)) for i, v in losses], logged, result.stdout


def test_default_moe_trains_with_step_update_and_logs(scripts_dir):
    losses, logged, stdout = run(scripts_dir, ENTRY, "--moe-default-vectors", "--moe-default-update", "step")
    assert [i for i, _ in losses] == [1, 2, 3]
    assert "> Default MoE" in stdout and "update='step'" in stdout
    assert sorted(logged) == [1, 2, 3]  # every --log-interval
    norms = [logged[i]["default_moe/vector_norm/layer_2"] for i in (1, 2, 3)]
    assert 0 < norms[0] < norms[1] < norms[2]  # one EMA step per optimizer step, from zero
    assert "default_moe/vector_norm/layer_1" not in logged[1]  # layer 1 is dense
    assert logged[1]["default_moe/term_norm_ratio/layer_3"] == 0.0  # step 1 used the zero table
    assert logged[3]["default_moe/term_norm_ratio/layer_3"] > 0.0
    assert logged[3]["default_moe/experts_updated/mean"] > 0


def test_flag_off_is_pretrain_gpt(scripts_dir):
    ours, logged, stdout = run(scripts_dir, ENTRY)
    theirs, _, _ = run(scripts_dir, str(scripts_dir / "pretrain_gpt.py"))
    assert not logged and "> Default MoE" not in stdout
    assert ours == theirs and len(ours) == 3
