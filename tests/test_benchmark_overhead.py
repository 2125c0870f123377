"""The overhead benchmark: its analytic communication model, and a smoke run at tiny shapes."""

import os
import subprocess
import sys

import helpers
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "benchmark_overhead.py")


def load_script():
    return helpers.load_script(SCRIPT, "benchmark_overhead")


def test_comm_bytes_is_one_fp32_table_per_layer():
    bench = load_script()
    payload, ring, a2a = bench.comm_bytes(experts=8, hidden=1024, topk=1, tokens=4096, ranks=8, layers=2)
    assert payload == 2 * 8 * 1025 * 4
    assert ring == pytest.approx(2 * 7 / 8 * payload)
    assert a2a == pytest.approx(2 * 4 * 4096 * 1 * 1024 * 2 * 7 / 8)
    assert bench.CONFIGS["32c4"] == (32, 704, 4) and bench.CONFIGS["8c1"] == (8, 2816, 1)


def test_interleaved_times_rotates_order():
    bench = load_script()
    calls = []
    steps = [lambda name=name: calls.append(name) for name in "abc"]
    times = bench.interleaved_times(steps, iters=3, warmup=1)
    assert "".join(calls) == "abc" + "abc" + "bca" + "cab"
    assert [len(t) for t in times] == [3, 3, 3]


def test_paired_ratio_and_flops():
    bench = load_script()
    r = bench.paired_ratio([2.0, 3.0, 4.0, 100.0], [1.0, 3.0, 2.0, 100.0])
    assert r["median"] == pytest.approx(1.5) and r["q1"] <= r["median"] <= r["q3"]
    # 8c1 at the paper's shapes: 4 E H / (3 K 4 H F) = 32 / (12 * 2816)
    assert bench.extra_flops_fraction(8, 1024, 2816, 1) == pytest.approx(32 / (12 * 2816))


@pytest.mark.distributed
def test_benchmark_smoke():
    cmd = [sys.executable, SCRIPT, "--configs", "8c1,32c4", "--hidden", "64", "--tokens", "32",
           "--iters", "2", "--warmup", "1", "--model-layers", "1", "--model-seq", "16", "--vocab", "64"]
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env["PYTHONWARNINGS"] = "ignore"  # and no rendezvous inherited from an in-process gloo world
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "machine:" in out and "Step time (forward + backward)" in out
    for name in ("8c1", "32c4"):
        assert f"\n{name:>6} |" in out.split("Step time")[1]
    assert "Memory (Default MoE extra)" in out and "Communication per MoE layer" in out
    assert "checkpoint has no default vectors" not in out + proc.stderr
