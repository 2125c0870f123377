"""The GPU-grade cost accounting (examples/benchmark_cost.py): exact counts on known ops, the
extrapolation, and one tiny TopK vs Default MoE run end to end; plus shellcheck of the GPU scripts."""

import json
import os
import shutil
import subprocess
import sys

import helpers
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "benchmark_cost.py")


@pytest.fixture(scope="module")
def bench():
    return helpers.load_script(SCRIPT, "benchmark_cost")


def count(bench, fn):
    mode = bench.CostMode()
    with mode:
        fn()
    return mode


def test_mm_bytes_flops_and_one_kernel(bench):
    a = torch.randn(6, 5, dtype=torch.bfloat16)
    b = torch.randn(5, 3, dtype=torch.bfloat16)
    (op,) = count(bench, lambda: a @ b).ops
    assert op["op"] == "mm" and op["kernels"] == 1 and op["phase"] == "fwd"
    assert op["bytes_read"] == (6 * 5 + 5 * 3) * 2 and op["bytes_written"] == 6 * 3 * 2
    assert op["flops"] == 2 * 6 * 3 * 5
    bias = torch.randn(3, dtype=torch.bfloat16)
    (op,) = count(bench, lambda: torch.addmm(bias, a, b)).ops
    assert op["flops"] == 2 * 6 * 3 * 5 and op["bytes_read"] == (30 + 15 + 3) * 2


def test_views_are_free_and_broadcasts_read_once(bench):
    x = torch.randn(4, 8)
    mode = count(bench, lambda: (x.t(), x.view(8, 4), x[1:3], x.unsqueeze(0).expand(3, 4, 8), x.detach()))
    assert mode.ops == []
    assert {"t", "view", "slice", "unsqueeze", "expand", "detach"} <= mode.free_seen
    row = torch.randn(1, 8)
    (op,) = count(bench, lambda: x * row.expand(4, 8)).ops
    assert op["bytes_read"] == (32 + 8) * 4 and op["bytes_written"] == 32 * 4 and op["flops"] == 0


def test_in_place_and_write_only_ops(bench):
    x, y = torch.randn(10), torch.randn(10)
    (op,) = count(bench, lambda: x.add_(y)).ops
    assert op["bytes_read"] == 80 and op["bytes_written"] == 40
    (op,) = count(bench, lambda: x.copy_(y)).ops
    assert op["bytes_read"] == 40 and op["bytes_written"] == 40
    (op,) = count(bench, lambda: x.new_zeros(3)).ops
    assert op["bytes_read"] == 0 and op["bytes_written"] == 12
    big, rows, src = torch.zeros(1000, 8), torch.tensor([3, 7]), torch.ones(2, 8)
    (op,) = count(bench, lambda: big.index_copy_(0, rows, src)).ops  # only the two rows: not 32 kB
    assert op["bytes_read"] == 16 + 64 and op["bytes_written"] == 64
    (op,) = count(bench, lambda: big.index_add_(0, rows, src)).ops  # reads the rows it adds to
    assert op["bytes_read"] == 16 + 64 + 64 and op["bytes_written"] == 64
    (op,) = count(bench, lambda: big.index_select(0, torch.tensor([3, 3, 7]))).ops  # the rows it gathers
    assert op["bytes_read"] == 24 + 96 and op["bytes_written"] == 96


def test_backward_ops_are_counted_and_syncs_flagged(bench):
    w = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(5, 4)
    mode = count(bench, lambda: (x @ w).sum().backward())
    phases = [(o["phase"], o["op"]) for o in mode.ops]
    assert ("fwd", "mm") in phases and ("bwd", "mm") in phases
    mask = torch.tensor([True, False, True, True, False])
    ops = count(bench, lambda: x[mask]).ops
    assert any(o["sync"] for o in ops)
    assert mode.peak_bytes > 0


def keyed(values):
    """A ``keyed`` dict of one op with the given fields."""
    rec = dict(bytes_read=values[0], bytes_written=values[1], flops=values[2], kernels=1, syncs=0, calls=1, ours=True)
    return {("fwd", "layer", "mul", "x.py:1 f", 0): rec}


def test_fit_recovers_a_plus_bT_and_bilinear_in_E(bench):
    a, b = 1000.0, 6.0
    points = [((t, 8), keyed((a + b * t, 2 * t, 0))) for t in (64, 128)]
    fitted, mismatched = bench.fit(points, (16384, 8))
    (rec,) = fitted.values()
    assert mismatched == 0 and rec["bytes_read"] == pytest.approx(a + b * 16384)
    assert rec["bytes_written"] == pytest.approx(2 * 16384) and rec["kernels"] == 1

    def f(t, e):
        return 5 + 2 * t + 3 * e + 0.5 * t * e

    points = [((t, e), keyed((f(t, e), 0, 0))) for t in (32, 64) for e in (16, 24)]
    (rec,) = bench.fit(points, (16384, 256))[0].values()
    assert rec["bytes_read"] == pytest.approx(f(16384, 256))


def test_fit_scales_expert_weights_to_local_experts(bench):
    weights, per_row = 8 * 1000.0, 10.0  # 8 experts of 1000 weight bytes; rows scale with T
    key = ("fwd", "experts", "mm", "SequentialMLP", 0)

    def points(kernels):  # grouped: one kernel over all experts; sequential: one per expert
        return [((t, 8), {key: dict(bytes_read=weights + per_row * t, bytes_written=0, flops=0, kernels=kernels,
                                    syncs=0, calls=8, ours=False)}) for t in (64, 128)]  # fmt: skip

    (out,) = bench.fit(points(1), (1000, 8), local_experts=2)[0].values()
    assert out["bytes_read"] == pytest.approx(2 * 1000 + per_row * 1000) and out["kernels"] == 1
    (out,) = bench.fit(points(8), (1000, 8), local_experts=2, experts_impl="sequential")[0].values()
    assert out["kernels"] == pytest.approx(2)  # the loop runs over the 2 local experts


def test_the_terms_backward_is_one_kernel_or_a_gemm_and_a_kernel_at_the_target(bench):
    """``default_weights_backward`` with the term's table: its ``2 T K H`` FLOPs counted; at the
    target shape one kernel where the launcher forms ``dL/dw`` in it, else a GEMM of its own
    (``dL/dy`` and the table read, ``[T, K]`` written, the FLOPs) and the kernel reading ``[T, K]``."""
    T, E, H = 64, 12, 40
    dy, table = torch.randn(T, H, dtype=torch.bfloat16), torch.randn(2 * E, H, dtype=torch.bfloat16)
    z, x, d = torch.randn(T, E), torch.randn(T, H, dtype=torch.bfloat16), torch.randn(H, dtype=torch.bfloat16)
    sel = torch.zeros(T, E, dtype=torch.bool)
    from megatron_default_moe.ops import ema as fused

    (op,) = count(bench, lambda: fused.default_weights_backward(dy, z, sel, sel, "softmax", True, False, 1.0, 0.0,
                                                                 None, None, x, d, table)).ops  # fmt: skip
    assert op["flops"] == 2 * T * 2 * E * H and op["term"] == (2, H, 2) and op["kernels"] == 1
    val = dict(bytes_read=10**9, bytes_written=T * 256 * 4, flops=2 * T * 512 * 7168, kernels=1, syncs=0, ours=True)
    key = ("bwd", "layer", "default_weights_backward", "router.py:1 routing", 0)
    assert bench.split_term(key, dict(val), (2, 7168, 2), 1024, 128) == {}  # [A; B] 256 x 7168: in the kernel
    kernel = dict(val)
    (gemm_key, gemm), = bench.split_term(key, kernel, (2, 7168, 2), 1024, 256).items()  # 512 rows: a GEMM
    assert gemm_key[2] == "mm" and gemm["flops"] == val["flops"] and kernel["flops"] == 0
    assert gemm["bytes_read"] == (1024 + 512) * 7168 * 2 and gemm["bytes_written"] == 1024 * 512 * 2
    assert kernel["bytes_read"] == val["bytes_read"] - gemm["bytes_read"] + 1024 * 512 * 2
    assert kernel["kernels"] == gemm["kernels"] == 1


def test_roofline_time(bench):
    gpu = bench.GPUS["h100"]
    mem_bound = dict(bytes_read=3.35e9, bytes_written=0, flops=1e9, kernels=2)
    assert bench.op_time(mem_bound, gpu) == pytest.approx(1e-3 + 8e-6)
    compute_bound = dict(bytes_read=1e6, bytes_written=0, flops=989e12, kernels=1)
    assert bench.op_time(compute_bound, gpu) == pytest.approx(1.0 + 4e-6)
    assert bench.GPUS["b200"]["hbm_bw"] == 8e12 and bench.GPUS["h200"]["bf16_flops"] == 989e12


def test_makespan_counts_waves_and_idle_sms(bench):
    gpu = dict(bench.GPUS["h100"])
    share = gpu["hbm_bw"] / gpu["sms"]
    assert bench.makespan([1e6] * 132, gpu) == pytest.approx(1e6 / share)  # one wave: full bandwidth
    assert bench.makespan([1e6] * 133, gpu) == pytest.approx(2e6 / share)  # a second wave for one program
    assert bench.makespan([1e6] * 66, gpu) == pytest.approx(1e6 / share)  # half the SMs idle: half the bandwidth
    assert bench.makespan([9e6] + [1e6] * 140, gpu) == pytest.approx(9e6 / share)  # a long program sets the time


@pytest.mark.parametrize("hot", [0.0, 0.9])
def test_stats_kernel_model_chunked_fills_the_gpu(bench, hot):
    """Paper 8c1 (16,384 rows, H 1024, 8 experts): the per-expert kernel runs 64 programs on 132 SMs
    (about 2x the full-bandwidth time balanced; a hot expert serialises: 6x), the chunked one stays
    within 10% of it balanced, 20% with 90% of the rows in one expert."""
    gpu = bench.GPUS["h100"]
    cols, hidden = 16384, 1024
    rows_L = [cols // 8] * 8 if not hot else [int(hot * cols)] + [(cols - int(hot * cols)) // 7] * 7
    full = sum(rows_L) * hidden * 2 / gpu["hbm_bw"]
    old, old_kernels, _, old_programs = bench.stats_kernel_model(rows_L, hidden, 8, gpu, "per-expert")
    new, kernels, scratch, programs = bench.stats_kernel_model(rows_L, hidden, 8, gpu, "chunked")
    assert old_programs == 64 and old_kernels == 1 and kernels == 2 and programs > 4 * gpu["sms"]
    assert old > (1.9 if not hot else 6.0) * full
    assert full < new < (1.1 if not hot else 1.2) * full and scratch < 0.05 * sum(rows_L) * hidden * 2


def test_reduced_experts_respects_groups(bench):
    ds = bench.SHAPES["deepseek-v3"]
    low, high = bench.reduced_experts(ds)
    assert low % 8 == 0 and high % 8 == 0 and low // 8 >= 2 and low < high < ds["experts"]


def test_rejected_router_falls_back_to_the_papers_for_both(bench, monkeypatch):
    from megatron_default_moe import DefaultMoEConfig

    ds = bench.SHAPES["deepseek-v3"]
    config, note = bench.resolve_router(ds, 16)
    if note is None:  # accepted as shipped: sigmoid, expert bias, groups, scaling kept
        assert config.moe_router_score_function == "sigmoid" and config.moe_router_topk_scaling_factor == 2.5

    def reject_sigmoid(self, cfg):
        if cfg.moe_router_score_function != "softmax":
            raise ValueError("Default MoE does not support --moe-router-score-function='sigmoid'")

    monkeypatch.setattr(DefaultMoEConfig, "validate", reject_sigmoid)
    config, note = bench.resolve_router(ds, 16)
    assert "BOTH TopK and Default" in note and "sigmoid" in note
    assert config.moe_router_score_function == "softmax" and config.moe_router_pre_softmax
    assert not config.moe_router_enable_expert_bias and config.moe_router_num_groups == 8


@pytest.mark.distributed
def test_tiny_layer_end_to_end(tmp_path):
    """TopK vs Default MoE at a tiny custom shape: Default adds kernels, all figures in the JSON."""
    out = tmp_path / "cost.json"
    cmd = [sys.executable, SCRIPT, "--shapes", "custom", "--hidden", "32", "--experts", "4", "--ffn", "64",
           "--topk", "2", "--tokens", "16", "--target-tokens", "1024", "--gpu", "h200", "--json", str(out),
           "--stats-stride", "1,4"]  # fmt: skip
    text = helpers.run_isolated(cmd, timeout_s=240, cwd=ROOT)
    assert "H200 SXM: HBM 4.80 TB/s" in text and "Default/TopK: time" in text
    report = json.loads(out.read_text())
    assert report["gpu"]["key"] == "h200" and "view" in report["free_ops"]
    r, r4 = report["shapes"]
    assert (r["stats_stride"], r4["stats_stride"]) == (1, 4) and r["topk"] == r4["topk"]  # TopK counted once
    assert r4["stats_kernel"]["sampled_rows"] == 1024 * 2 // 4 and r["stats_kernel"]["kernels"] == 2
    for field in ("topk", "default", "ratio_time", "ratio_bytes", "extra_kernels", "extra_peak_bytes",
                  "extra_ops", "ops", "notes", "measured_tokens"):  # fmt: skip
        assert field in r, field
    for variant in ("topk", "default"):
        assert {"bytes", "flops", "kernels", "syncs", "time_s", "peak_bytes"} <= set(r[variant])
    assert r["default"]["kernels"] >= r["topk"]["kernels"] and r["extra_kernels"] > 0
    assert r["ratio_time"] > 1.0 and r["default"]["flops"] >= r["topk"]["flops"]
    # every extra kernel is accounted for: issued by the package, or a residual difference
    assert sum(row["kernels"] for row in r["extra_ops"]) == pytest.approx(r["extra_kernels"])
    assert r["measured_tokens"] == [16, 32] and r["unmatched_keys"] == {"topk": 0, "default": 0}


def test_probes_rows_and_traffic(tmp_path):
    """With probes: B more expert rows (the experts' FLOPs grow by B / (T K)), the all-to-all's
    bytes by the same fraction, and the rule's budget from E / EP."""
    out = tmp_path / "cost.json"
    cmd = [sys.executable, SCRIPT, "--shapes", "custom", "--hidden", "32", "--experts", "4", "--ffn", "64",
           "--topk", "2", "--tokens", "16", "--target-tokens", "1024", "--probes", "64", "--ep", "2",
           "--fit", "shared-1", "--json", str(out)]  # fmt: skip
    text = helpers.run_isolated(cmd, timeout_s=240, cwd=ROOT)
    assert "--moe-default-probes 64" in text and "probes: 64 per GPU" in text
    (r,) = json.loads(out.read_text())["shapes"]
    p = r["probe_traffic"]
    assert p["probes"] == 64 and p["routed_rows"] == 2048 and p["extra_row_fraction"] == 64 / 2048
    assert p["a2a_bytes_extra"] / p["a2a_bytes_topk"] == pytest.approx(64 / 2048)
    # measured with 1 and 2 probes at 16 and 32 tokens: 64 at 1024, per GPU at EP = 2 as well
    assert r["extra_expert_flops_fraction"] == pytest.approx(64 / 2048, rel=1e-6)
    assert r["unmatched_keys"] == {"topk": 0, "default": 0}
    # the shared-1 fit: g_A + s g_B formed inside the weights' backward (no addcmul of its own),
    # and the direction in the activations' dtype from the last update's table (no cast)
    assert "--moe-default-fit shared-1" in text
    ours = [o for o in r["extra_ops"] if o["ours"]]
    assert {(o["phase"], o["op"]) for o in ours} >= {("bwd", "default_weights_backward"), ("fwd", "fit_update"),
                                                     ("fwd", "probe_add")}  # fmt: skip
    assert not [o for o in ours if o["op"] == "addcmul" or (o["op"] == "_to_copy" and "shared_fit" in o["where"])]
    # the draw and both copies are one op (one kernel): no draw or index_put of their own
    assert not [o for o in ours if o["op"] in ("probe_draw", "index_put", "index_put_")]
    # the probe rows' coordinates in one op (no gather, no GEMV of their own); in this forward-mode
    # layer the term's s = x·d is the one GEMV of the forward (backward-only: tests/test_functional.py)
    assert ("fwd", "probe_coordinates") in {(o["phase"], o["op"]) for o in ours}
    assert not [o for o in ours if o["op"] == "index_select"]
    assert len([o for o in ours if o["phase"] == "fwd" and o["op"] == "mm"]) == 1
    assert not [o for o in ours if o["phase"] == "bwd" and o["op"] == "zeros"]  # no gradient materialised
    # the term's dL/dw = dL/dy @ [A; B]ᵀ is formed inside the weights' backward: no matmul of its own
    assert not [o for o in ours if o["phase"] == "bwd" and o["op"] in ("mm", "mm_fp32", "addmm")]


def test_probe_budget_rule(bench):
    import argparse

    spec = bench.SHAPES["qwen3-30b-a3b"]
    args = argparse.Namespace(dp=1, tokens=256, target_tokens=16384)
    assert bench.probe_budget_of(args, spec, 8, "rule") == 8 * 128 // 8
    assert bench.probe_budget_of(argparse.Namespace(**dict(vars(args), dp=2)), spec, 8, "rule") == 64
    with pytest.raises(SystemExit, match="scales to 4.6875 probes"):
        bench.probe_budget_of(args, spec, 8, "300")


def test_probes_and_fit_default_to_the_packages_for_each_router(bench):
    """Unset, the benchmark counts what the package runs: DeepSeek-V3's sigmoid and Qwen3's
    renormalised routers probe by the rule with the shared-1 fit, the paper's runs the EMA of the
    routed rows; a stride other than 1 turns the default off; explicit flags win."""
    import argparse

    args = argparse.Namespace(probes="default", fit="default", dp=1, tokens=None, target_tokens=16384,
                              stats_strides=[1])  # fmt: skip
    assert bench.probes_and_fit_of(args, bench.SHAPES["deepseek-v3"], 64) == (8 * 256 // 64, "shared-1")
    assert bench.tokens_of(args, 8 * 256 // 64) == 512 and bench.tokens_of(args, 128) == 256  # >= 1 probe at T
    assert bench.probes_and_fit_of(args, bench.SHAPES["qwen3-30b-a3b"], 8) == (8 * 128 // 8, "shared-1")
    assert bench.probes_and_fit_of(args, bench.SHAPES["paper-8c1"], 1) == (0, "constant")
    strided = argparse.Namespace(**dict(vars(args), stats_strides=[4]))
    assert bench.probes_and_fit_of(strided, bench.SHAPES["deepseek-v3"], 64) == (0, "constant")
    assert bench.probes_and_fit_of(strided, bench.SHAPES["qwen3-30b-a3b"], 8) == (0, "constant")
    given = argparse.Namespace(**dict(vars(args), probes="0"))
    assert bench.probes_and_fit_of(given, bench.SHAPES["qwen3-30b-a3b"], 8) == (0, "constant")
    given = argparse.Namespace(**dict(vars(args), fit="constant"))
    assert bench.probes_and_fit_of(given, bench.SHAPES["qwen3-30b-a3b"], 8) == (128, "constant")
    with pytest.raises(SystemExit, match="--fit shared-1"):
        bench.probes_and_fit_of(argparse.Namespace(**dict(vars(args), fit="shared-1")), bench.SHAPES["paper-8c1"], 1)


GPU_SCRIPTS = [os.path.join(ROOT, "scripts", name) for name in ("gpu_check.sh", "gpu_wheels.sh")]


@pytest.mark.parametrize("script", GPU_SCRIPTS, ids=os.path.basename)
def test_gpu_scripts_pass_shellcheck(script):
    assert os.access(script, os.X_OK) and open(script).readline().startswith("#!/usr/bin/env bash")
    shellcheck = shutil.which("shellcheck", path=os.pathsep.join([os.path.dirname(sys.executable),
                                                                  os.environ.get("PATH", "")]))  # fmt: skip
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run([shellcheck, "--shell=bash", "--external-sources", script], capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_kernel_model_table(bench, capsys):
    bench.main(["--kernel-model-only", "--stats-stride", "1,8"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("paper", "qwen3", "deepseek"))]
    assert len(lines) == 6 and lines[0].split()[:2] == ["paper-8c1", "1"]
