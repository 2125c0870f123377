"""Real Megatron-LM training iterations of examples/pretrain_gpt_default_moe.py on CPU (mock data).

Needs a Megatron-LM checkout (``pretrain_gpt.py`` is not in the megatron-core wheel): set
``MEGATRON_LM_DIR`` (``git clone --branch core_v0.19.0 https://github.com/NVIDIA/Megatron-LM``;
``.ci/run`` sets it to ``../shared/megatron-lm-core_v0.19.0`` when that exists); skipped
otherwise. Only the checkout's top-level scripts are used (linked into a temporary directory), so
``megatron.*`` is the installed megatron-core, as everywhere else in the tests.

On CPU, ``pretrain()`` meets a few CUDA-only calls that ``megatron_default_moe.testing.cpu`` does
not cover (``initialize_megatron``'s CUDA assert, ``device_count() > 0`` gating model-parallel
init, compiling the dataset helpers that the wheel ships prebuilt); ``RUNNER`` stands them in
before running the script. Megatron's default RNG tracker runs as it is (the shim covers it).
Gradient clipping is off (``clip_grad_by_total_norm_fp32`` asserts CUDA tensors). The body of
``RUNNER`` is guarded: checkpoint saving starts a writer process with ``spawn``.
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
HYBRID_ENTRY = os.path.join(ROOT, "examples", "pretrain_hybrid_default_moe.py")
CHECKOUT = os.environ.get("MEGATRON_LM_DIR")

pytestmark = pytest.mark.skipif(
    not CHECKOUT or not os.path.isfile(os.path.join(CHECKOUT or "", "pretrain_gpt.py")),
    reason="needs a Megatron-LM checkout: set MEGATRON_LM_DIR "
    "(git clone --branch core_v0.19.0 https://github.com/NVIDIA/Megatron-LM)",
)

RUNNER = r'''
import functools, json, os, runpy, sys


def main():
    sys.path.insert(0, os.environ["MEGATRON_LM_DIR"])
    from megatron_default_moe.testing import cpu

    cpu.enable()
    import torch

    torch.cuda.device_count = lambda: 1
    torch.cuda.set_device = lambda *a, **k: None
    from megatron.core.datasets import utils as dataset_utils

    dataset_utils.compile_helpers = lambda: None
    from megatron.training import training

    training.initialize_megatron = functools.partial(training.initialize_megatron, allow_no_cuda=True)
    from megatron_default_moe.analysis import metrics as metrics

    log = metrics.log_default_moe_metrics

    def log_and_print(model, iteration, *args, **kwargs):
        out = log(model, iteration, *args, **kwargs)
        print("DEFAULT_MOE_METRICS", iteration, json.dumps(out), flush=True)
        return out

    metrics.log_default_moe_metrics = log_and_print
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
'''

TINY_MODEL = [
    "--hidden-size", "32", "--num-attention-heads", "4",
    "--seq-length", "16", "--max-position-embeddings", "16",
    "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3", "--lr", "1e-3",
    "--lr-decay-style", "constant", "--clip-grad", "0.0", "--log-interval", "1", "--eval-iters", "0", "--eval-interval", "100",
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "64",
    "--num-experts", "4", "--moe-router-topk", "1",
    "--moe-router-score-function", "softmax", "--moe-router-pre-softmax",
    "--moe-token-dispatcher-type", "alltoall", "--distributed-backend", "gloo",
    "--transformer-impl", "local", "--no-persist-layer-norm", "--no-gradient-accumulation-fusion",
    "--no-bias-gelu-fusion", "--disable-bias-linear", "--no-masked-softmax-fusion",
    "--no-bias-dropout-fusion", "--no-rope-fusion",
]  # fmt: skip
TINY_GPT = ["--num-layers", "3", "--moe-layer-freq", "([0]+[1]*2)", *TINY_MODEL]  # fmt: skip
SCRIPTS = ("pretrain_gpt.py", "gpt_builders.py", "pretrain_hybrid.py", "hybrid_builders.py", "model_provider.py")


@pytest.fixture(scope="module")
def scripts_dir(tmp_path_factory):
    """The checkout's top-level scripts only (each pretrain_*.py imports some of its siblings)."""
    path = tmp_path_factory.mktemp("megatron_lm_scripts")
    for name in SCRIPTS:
        if os.path.isfile(os.path.join(CHECKOUT, name)):
            os.symlink(os.path.join(CHECKOUT, name), path / name)
    (path / "runner.py").write_text(RUNNER)
    return path


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(scripts_dir, script, *flags, model=TINY_GPT, expect_failure=False):
    """Run ``script`` under ``RUNNER``; returns ``(losses, logged metrics, stdout + stderr)``."""
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
        PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), ROOT, os.environ.get("PYTHONPATH", "")]),
    )
    result = subprocess.run(
        [sys.executable, str(scripts_dir / "runner.py"), script, *model, *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    if expect_failure:
        assert result.returncode != 0, output[-3000:]
        return None, None, output
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    losses = re.findall(r"iteration\s+(\d+)/\s*\d+ .*?\| lm loss: (\S+) \|", result.stdout)
    logged = {
        int(step): json.loads(values)
        for step, values in re.findall(r"^DEFAULT_MOE_METRICS (\d+) (.*)$", result.stdout, re.M)
    }
    return [(int(i), float(v)) for i, v in losses], logged, output


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


def test_help_lists_megatron_and_default_moe_flags(scripts_dir):
    """core_v0.19.0's own ``pretrain_gpt.py --help`` raises (a stray ``%``); ours must not."""
    env = dict(os.environ, MEGATRON_LM_DIR=str(scripts_dir), PYTHONWARNINGS="ignore")
    for script in (ENTRY, HYBRID_ENTRY):
        result = subprocess.run([sys.executable, script, "--help"], env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
        out = " ".join(result.stdout.split())
        assert "--num-layers NUM_LAYERS" in out and "--moe-router-topk" in out and "1.10 = 10%)." in out
        assert "Default MoE (arXiv 2504.12463): --moe-default-vectors" in out and "--moe-default-ema-beta" in out


def test_topk_checkpoint_continues_with_one_flag(scripts_dir, tmp_path):
    """pretrain_gpt.py saves a TopK run; ``--load`` it ``--moe-default-vectors`` and nothing else."""
    ckpt = str(tmp_path / "ckpt")
    topk, _, _ = run(scripts_dir, str(scripts_dir / "pretrain_gpt.py"), "--exit-interval", "2", "--save", ckpt, "--save-interval", "2")
    assert [i for i, _ in topk] == [1, 2]
    losses, logged, output = run(
        scripts_dir, ENTRY, "--load", ckpt, "--save", ckpt, "--save-interval", "100",
        "--moe-default-vectors", "--moe-default-update", "step",
    )  # fmt: skip
    assert [i for i, _ in losses] == [3]  # resumed at iteration 2
    assert output.count("the checkpoint has no default vectors") == 1
    assert logged[3]["default_moe/term_norm_ratio/layer_3"] == 0.0  # iteration 3 used the zero table
    assert logged[3]["default_moe/vector_norm/layer_3"] > 0.0  # one EMA step from zero after it
    # Any other key the checkpoint lacks still fails as Megatron decides: here QK layer norms.
    _, _, output = run(scripts_dir, ENTRY, "--load", ckpt, "--moe-default-vectors", "--qk-layernorm", expect_failure=True)
    tail = output[-3000:]
    assert "q_layernorm.weight from model not in state dict" in output, tail
    assert "default_vectors from model not in state dict" not in output, tail
