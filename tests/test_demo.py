"""The README's demo in a smoke configuration: torchrun, 2 ranks, EP=2, gloo, a few steps."""

import json
import os
import sys

import pytest
from helpers import run_isolated

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--layers", "2", "--hidden", "32", "--heads", "2", "--seq-len", "32", "--micro-batch", "2",
        "--corpus-bytes", "1000000", "--eval-iters", "1"]


def run_demo(out, *flags, timeout=180):
    cmd = [sys.executable, os.path.join(ROOT, "examples", "cpu_demo.py"), "--out", str(out), *TINY, *flags]
    return run_isolated(cmd, timeout, cwd=ROOT, stderr_to_stdout=False)  # tqdm's bar stays on stderr


@pytest.mark.distributed
def test_demo_smoke(tmp_path):
    stdout = run_demo(tmp_path, "--steps", "4", "--eval-interval", "2")
    assert "Loss (nats per byte" in stdout
    table = stdout[stdout.index("Loss (nats per byte"):]
    assert all(f"\n{step:>5} |" in table for step in (0, 2, 4)), table
    assert "Final: valid loss TopK" in stdout
    assert "Router gradient vs the dense one" in stdout and "Default vectors after training" in stdout
    for png in ("cpu_demo_loss.png", "cpu_demo_router_grad_cosine.png"):
        assert (tmp_path / png).stat().st_size > 1000
    results = json.loads((tmp_path / "cpu_demo_results.json").read_text())
    assert results["world_size"] == 2 and results["args"]["ep"] == 2
    assert results["checkpoints"] == [0, 2, 4]
    topk, default = results["valid_loss"]["TopK"], results["valid_loss"]["Default MoE"]
    assert topk[0] == pytest.approx(default[0], abs=1e-6)  # same seed, same weights, zero vectors
    assert len(results["train_loss"]["TopK"]) == 4
    layers = results["default_vectors"]
    assert layers and all(layer["nonzero"] > 0 for layer in layers)  # the EMA ran on both ranks' stats
    cos = results["router_grad_cosines"]
    # step 0: both models are the same model (same weights, Default MoE's vectors zero), so TopK
    # routing measures the same in both, and Default MoE's own gradient is its TopK one
    for layer, dm in cos["Default MoE"]["0"].items():
        assert dm["topk"] == pytest.approx(cos["TopK"]["0"][layer]["topk"], abs=1e-6)
        assert dm["default"] == pytest.approx(dm["topk"], abs=1e-6) and dm["extra_ratio"] == 0.0
    # step 4: the vectors are filled in, and the default term changes every layer's router gradient
    for layer, dm in cos["Default MoE"]["4"].items():
        assert dm["extra_ratio"] > 0 and abs(dm["default"] - dm["topk"]) > 1e-6, (layer, dm)
    assert all(c["default"] is None for step in cos["TopK"].values() for c in step.values())


@pytest.mark.distributed
def test_demo_step_update_mode(tmp_path):
    stdout = run_demo(tmp_path, "--steps", "2", "--eval-interval", "2", "--no-plot", "--no-diagnostics",
                      "--micro-batches", "2", "--moe-default-update", "step")
    assert "update=step" in stdout and "Final: valid loss TopK" in stdout
    results = json.loads((tmp_path / "cpu_demo_results.json").read_text())
    assert all(layer["nonzero"] > 0 for layer in results["default_vectors"])


def test_byte_corpus_through_megatron_datasets(tmp_path):
    from megatron_default_moe.testing.data import (
        ByteTokenizer,
        build_gpt_datasets,
        write_byte_corpus,
    )

    tok = ByteTokenizer()
    assert tok.detokenize(tok.tokenize("def f(x):\n    return x")) == "def f(x):\n    return x"
    assert (tok.vocab_size, tok.eod, tok.pad) == (258, 256, 257)

    prefix = str(tmp_path / "corpus")
    assert write_byte_corpus(prefix, max_bytes=400_000, seed=0) > 0
    assert write_byte_corpus(prefix, max_bytes=400_000, seed=0) == -1  # kept, not rebuilt
    train, valid, test = build_gpt_datasets(prefix, seq_length=64, num_samples=[50, 10, 0])
    assert test is None and len(train) >= 50 and len(valid) >= 10
    sample = train[0]
    assert sample["tokens"].shape == (64,) and int(sample["tokens"].max()) <= tok.eod
    assert bytes(sample["tokens"][1:].tolist()) == bytes(sample["labels"][:-1].tolist())  # shifted by one

    with pytest.raises(ValueError, match="valid split"):
        build_gpt_datasets(prefix, seq_length=64, num_samples=[50, 10, 0], split="999999,1,0")
