"""examples/experiments.py: the statistics by hand, and ``--quick`` end to end (torchrun, 2 ranks,
EP=2) including a restart that must reuse every run."""

import json
import math
import os
import sys

import pytest
from helpers import load_script, run_isolated

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "experiments.py")


@pytest.fixture(scope="module")
def exp():
    return load_script(SCRIPT, "experiments_under_test")


def test_t_interval_by_hand(exp):
    mean, half = exp.t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == pytest.approx(3.0)
    assert half == pytest.approx(2.776 * math.sqrt(2.5) / math.sqrt(5))  # t(0.975, 4) * sd / sqrt(n)
    mean, half = exp.t_interval([0.1, -0.3])
    assert mean == pytest.approx(-0.1) and half == pytest.approx(12.706 * math.sqrt(0.08) / math.sqrt(2))
    assert math.isnan(exp.t_interval([1.0])[1])


def test_count_spikes(exp):
    # warm-up 2: steps 1-2 ignored; step 4 (3.1 > 1.5 * 2.0) is a spike, step 5 (2.9 < 3.0) is not
    assert exp.count_spikes([9.0, 5.0, 2.0, 3.1, 2.9], warmup=2) == (1, pytest.approx(3.1 / 2.0))
    assert exp.count_spikes([9.0, 8.0, 7.0], warmup=1)[0] == 0
    assert exp.count_spikes([3.0, 2.0, float("nan"), float("inf")], warmup=1) == (2, math.inf)  # diverged


def test_summary_and_torn_results_file(exp, tmp_path):
    path = tmp_path / "runs.jsonl"
    for seed, (t, d) in enumerate([(2.0, 1.9), (2.1, 2.15), (2.2, 2.0)], 1):
        exp.append_run(str(path), dict(cell="c", seed=seed, valid_topk=t, valid_default=d,
                                       spikes_topk=seed, spikes_default=0))
    with open(path, "a") as f:
        f.write('{"cell": "c", "se')  # a kill in mid-write
    runs = exp.load_runs(str(path))
    assert len(runs) == 3
    cell = dict(name="c", router="paper", lr=3e-3, weighting="uniform", beta=0.9)
    s = exp.summarise(cell, runs)
    diffs = [-0.1, 0.05, -0.2]
    assert s["diff_mean"] == pytest.approx(sum(diffs) / 3)
    assert (s["wins"], s["spikes_topk"], s["spikes_default"]) == (2, 6, 0)
    assert exp.verdict(s) == "no difference"


def test_grid(exp):
    cells = exp.grid()
    assert len(cells) == 12 and len({c["name"] for c in cells}) == 12
    assert sum(c["router"] == "paper" for c in cells) == 8  # 2 lr x 2 weightings x 2 betas
    assert {c["lr"] for c in cells} == {exp.BASE_LR, 4 * exp.BASE_LR}


def test_probe_settings_reach_the_demo(exp):
    """One ``--probes`` grammar for the sweep and ``--fidelity``: every setting reaches cpu_demo's flags."""
    assert exp.probe_flags("64") == dict(moe_default_probes=64, moe_default_probe_draw="uniform",
                                         moe_default_fit="constant", moe_default_fit_beta=None)
    assert exp.probe_flags("32w")["moe_default_probe_draw"] == "weighted"
    assert exp.probe_flags("64s@0.99")["moe_default_fit_beta"] == 0.99
    unset = exp.probe_flags("default")  # --fidelity: the package's default for the router family
    assert unset["moe_default_probes"] is None and unset["moe_default_fit"] is None
    for bad in ("", "s64", "64x", "64@0.9", "64s@", "64s@x"):
        with pytest.raises(SystemExit, match="--probes"):
            exp.probe_flags(bad)
    cells = exp.grid(probes="64s")
    assert len(cells) == 8 and all(c["name"].endswith(" probes=64s") for c in cells)  # probes: uniform weighting only
    d = exp.demo_args([], cells[0], 1, "out")
    assert (d.moe_default_probes, d.moe_default_probe_draw, d.moe_default_fit) == (64, "uniform", "shared-1")
    assert d.moe_default_fit_beta is None and exp.demo_args([], exp.grid()[0], 1, "out").moe_default_fit == "constant"
    assert exp.demo_args([], exp.grid(probes="64s@0")[0], 1, "out").moe_default_fit_beta == 0.0  # a beta of 0 too
    mixtral = next(c for c in exp.grid(probes="default", lr_scales="8,16") if c["router"] == "mixtral")
    d = exp.demo_args([], mixtral, 1, "out")  # the sweep at the family's defaults: the flags left unset
    assert mixtral["lr"] == 8 * exp.BASE_LR and (d.moe_default_probes, d.moe_default_fit) == (None, None)


@pytest.mark.distributed
def test_quick_sweep_end_to_end_and_restart(exp, tmp_path):
    cmd = [sys.executable, SCRIPT, "--quick", "--out", str(tmp_path)]
    out = run_isolated(cmd, 240, cwd=ROOT)
    runs = exp.load_runs(str(tmp_path / "runs.jsonl"))
    assert len(runs) == 4 and {r["seed"] for r in runs} == {1, 2}
    for r in runs:
        assert r["world_size"] == 2 and len(r["train_topk"]) == len(r["train_default"]) == 6
        assert all(math.isfinite(r[k]) for k in ("valid_topk", "valid_default"))
        assert r["spikes_topk"] >= 0 and r["spikes_default"] >= 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["cells"]) == 2
    for s in summary["cells"]:
        mine = [r for r in runs if r["cell"] == s["cell"]]
        d = [r["valid_default"] - r["valid_topk"] for r in mine]
        mean, sd = sum(d) / 2, math.sqrt(sum((x - sum(d) / 2) ** 2 for x in d))
        assert s["diff_mean"] == pytest.approx(mean)
        assert s["diff_ci95"] == pytest.approx(12.706 * sd / math.sqrt(2))
        assert s["wins"] == sum(x < 0 for x in d)
    assert "Dflt-TopK [95% CI]" in out and (tmp_path / "paired_diff.png").stat().st_size > 1000

    log_size = (tmp_path / "worker.log").stat().st_size
    again = run_isolated(cmd + ["--no-plot"], 60, cwd=ROOT)
    assert "4 runs reused" in again
    assert len(exp.load_runs(str(tmp_path / "runs.jsonl"))) == 4  # no new runs
    assert (tmp_path / "worker.log").stat().st_size == log_size  # no launch at all


def test_fidelity_quick_end_to_end(tmp_path):
    """``--fidelity`` (examples/fidelity.py) on the tiny model: every checkpoint holds each variant's
    cosines and Gram matrix, the base variant's oracles and richer-default candidates, and the
    exact candidate reproduces the dense gradient (cosine 1)."""
    out = tmp_path / "fid"
    text = run_isolated([sys.executable, SCRIPT, "--fidelity", "--quick", "--router", "mixtral", "--probes", "8",
                         "--steps", "2", "--out", str(out), "--no-plot"], timeout_s=600, cwd=ROOT)  # fmt: skip
    assert "Richer defaults" in text and "shared-4" in text
    result = json.loads((out / "fidelity_mixtral.json").read_text())
    assert [n for n, _ in result["variants"]] == ["uniform b=0.9", "probes 8"]
    h = result["history"]
    for step in ("0", "1", "2"):
        base = h["uniform b=0.9"][step]
        for variant in ("uniform b=0.9", "probes 8"):
            assert set(h[variant][step]["gram"]) == set(base["bias"])  # every MoE layer
        for layer, gram in base["richer"]["exact"].items():
            assert gram["dg"] / math.sqrt(gram["dd"] * gram["gg"]) == pytest.approx(1.0, abs=1e-5), (step, layer)
            assert base["richer"]["constant"][layer]["fit_error"] == pytest.approx(1.0)


def test_fidelity_over_seeds_by_hand():
    """``fidelity_seeds``: per-run means over the checkpoints after step 0, then over seeds, and the
    win counts in both views (same model: V >= T|V; per model: V >= T and T|D)."""
    seeds = load_script(os.path.join(ROOT, "examples", "fidelity_seeds.py"), "fidelity_seeds_under_test")

    def run(seed, t, tv, v):  # one layer "2"; step 0 must be ignored
        def point(topk, default):
            return {"cos": {"2": {"topk": topk, "default": default}}, "oracle_unchosen": {"2": 0.9}}

        return {"args": {"router": "mixtral", "seed": seed}, "variants": [["base", {}], ["V", {}]],
                "history": {"TopK": {"0": point(9.0, None), "10": point(t[0], None), "20": point(t[1], None)},
                            "base": {"0": point(9.0, 9.0), "10": point(0.5, 0.1), "20": point(0.5, 0.1)},
                            "V": {"0": point(9.0, 9.0), "10": point(tv[0], v[0]), "20": point(tv[1], v[1])}}}

    runs = [run(1, (0.4, 0.6), (0.3, 0.5), (0.6, 0.6)),  # V 0.6: >= T|V 0.4, >= T 0.5 and T|D 0.5
            run(2, (0.8, 0.8), (0.2, 0.2), (0.7, 0.5))]  # V 0.6: >= T|V 0.2, < T 0.8
    means = seeds.run_means(runs[0], "V")["2"]
    assert means["T"] == pytest.approx(0.5) and means["T|V"] == pytest.approx(0.4) and means["V"] == pytest.approx(0.6)
    text = seeds.seeds_table(runs + [{"args": {"router": "paper", "seed": 3}, "history": {"TopK": {"0": {}}}}], "V")
    row = next(line for line in text.splitlines() if line.startswith("mixtral"))
    assert row.split()[3:9] == ["0.650", "0.300", "0.500", "0.100", "0.600", "0.900"]
    assert row.split()[9:] == ["2/2", "1/2"]
    assert "same model (V >= T|V) 2/2; per model (V >= T and T|D) 1/2" in text and "paper seed 3" in text
    assert "all three TopK means: 0/1" in text  # mean V 0.6 < mean T 0.65
    markdown = seeds.seeds_table(runs, "V", markdown=True).splitlines()
    assert markdown[0].startswith("| family | layer | seeds | T | T\\|V |")
    assert markdown[2] == "| mixtral | 2 | 2 | 0.65 | 0.30 | 0.50 | 0.10 | 0.60 | 0.90 | 2/2 | 1/2 |"
    with pytest.raises(SystemExit, match="'W' is not in this run"):
        seeds.run_means(runs[0], "W")
