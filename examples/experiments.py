#!/usr/bin/env python
"""Paired TopK vs Default MoE runs with error bars, and per-layer fidelity over training.

    python examples/experiments.py              # the whole grid: 12 cells x 5 seeds (60 paired runs, 70-110 min)
    python examples/experiments.py --seeds 3 --cells "b=0.9$|mixtral|deepseek"   # a subset (regex on cell names)
    python examples/experiments.py --quick      # tiny model, 2 cells x 2 seeds (the test suite runs it)
    python examples/experiments.py --fidelity   # per-layer router-gradient cosine and default-vector bias

Each run trains a TopK and a Default MoE Megatron GPTModel from the same seed on the same batches
(``cpu_demo``'s machinery: Megatron datasets, DDP, Adam, ``forward_backward_no_pipelining``), under
``torchrun`` with 2 ranks and EP = 2 on CPU. One ``torchrun`` launch runs all missing runs (a launch
costs about 12 s on an idle machine, 30 s on a loaded one; a rank needs ~1 GB). Every finished run is
appended to ``<out>/runs.jsonl`` at once; a restart reuses the runs there with the same model
settings, so a killed sweep loses at most the run in progress.

Grid: router families paper (softmax, pre-softmax, top-1), mixtral (softmax, renormalised, top-2)
and deepseek-v3 (sigmoid, bias, groups, scaling 2.5, shared expert, top-2) x learning rate (the
demo's 3e-3 and 4x) and, for the paper router, EMA weighting (uniform, router) x beta (0.9, 0.99).
Model at defaults (measured on a shared 2-core machine: 70-290 s per paired run, 95 s on average
over the last 42, so the whole grid takes 70-110 min; ``--seeds 3`` about 45-65 min):
3 layers (first dense, 2 MoE layers of 8 experts), hidden 64, 200 steps of 16 x 64 byte tokens,
valid loss on 2 x 2 x 8 sequences of 64 bytes. Per cell: final valid loss of each method, the paired difference (Default - TopK) with
its mean and 95% t-interval over seeds, wins (seeds where Default is lower), and loss spikes: steps
after warm-up whose train loss exceeds 1.5x the running minimum of the steps before.
"""

import argparse
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# Model and run sizes: flags of cpu_demo.py.
SIZES = {
    "default": ["--layers", "3", "--hidden", "64", "--heads", "4", "--seq-len", "64", "--micro-batch", "8",
                "--steps", "200", "--warmup", "20", "--eval-iters", "2", "--corpus-bytes", str(4 << 20)],
    "quick": ["--layers", "2", "--hidden", "32", "--heads", "2", "--seq-len", "32", "--micro-batch", "2",
              "--steps", "6", "--warmup", "2", "--eval-iters", "1", "--corpus-bytes", "1000000"],
}
TOPK = {"paper": 1, "mixtral": 2, "deepseek-v3": 2}
BASE_LR = 3e-3
SPIKE_FACTOR = 1.5
# two-sided 95% Student t quantiles, df 1..30 (no scipy needed)
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join("out", "experiments"))
    p.add_argument("--seeds", type=int, default=5, help="seeds per cell (1..N)")
    p.add_argument("--cells", default="", help="run only cells whose name matches this regular expression")
    p.add_argument("--steps", type=int, default=None, help="override the size's step count")
    p.add_argument("--quick", action="store_true", help="tiny model, 2 cells, 2 seeds (test suite)")
    p.add_argument("--fidelity", action="store_true", help="per-layer cosine and bias over training")
    p.add_argument("--router", default="paper", choices=sorted(TOPK), help="--fidelity: the router family")
    p.add_argument("--fidelity-seed", type=int, default=1234,
                   help="--fidelity: the run's seed (the demo's 1234 by default; others write *_seed<N>.json)")
    p.add_argument("--probes", default="", help="sweep: Default MoE with --moe-default-probes N (cells "
                   "tagged probes=N); --fidelity: compare probes at these budgets (comma-separated) with today's "
                   "EMA. Per rank and micro-batch; a 'w' suffix draws weighted, an 's' fits --moe-default-fit "
                   "shared-1, '@B' sets its --moe-default-fit-beta (e.g. 64, 64w, 64s, 64s@0.99)")
    p.add_argument("--lr-scales", default="1,4", help="sweep: learning rates as multiples of the demo's 3e-3 "
                   "(comma-separated; e.g. 8,16,32 to look for the rate where each method spikes or diverges)")
    p.add_argument("--stats-stride", type=int, default=1,
                   help="Default MoE's --moe-default-stats-stride for every cell (names tagged stride=N)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--report-only", action="store_true", help="summarise the runs on file, launch nothing")
    # internal: one torchrun launch
    p.add_argument("--worker", choices=("cell", "fidelity"), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick and "--seeds" not in (argv if argv is not None else sys.argv):
        args.seeds = 2
    return args


# -- the grid and its statistics -------------------------------------------------------------------
def probe_flags(spec: str) -> dict:
    """One ``--probes`` entry (``64``, ``64w``, ``64s``, ``64s@0.99``) as Default MoE settings: the
    budget, a weighted draw for 'w', the ``shared-1`` fit for 's', its beta after '@'; ``default``
    leaves them unset (the package's default for the router family)."""
    if spec == "default":
        return dict(moe_default_probes=None, moe_default_probe_draw="uniform", moe_default_fit=None,
                    moe_default_fit_beta=None)
    m = re.fullmatch(r"(\d+)([ws]*)(?:@(\d*\.?\d+))?", spec)
    if not m or (m[3] and "s" not in m[2]):
        raise SystemExit(f"--probes: cannot read {spec!r} (a budget with optional 'w' / 's' suffixes, '@beta' after 's', or 'default')")
    return dict(moe_default_probes=int(m[1]), moe_default_probe_draw="weighted" if "w" in m[2] else "uniform",
                moe_default_fit="shared-1" if "s" in m[2] else "constant",
                moe_default_fit_beta=float(m[3]) if m[3] else None)


def grid(quick=False, stats_stride=1, probes="", lr_scales="1,4"):
    """The cells: dicts of router, lr, ema weighting, beta, probe settings and a readable name
    (tagged ``stride=N`` when Default MoE runs with ``--moe-default-stats-stride N``, ``probes=S``
    with ``--probes S``)."""
    if probes and stats_stride != 1:
        raise SystemExit("--stats-stride does not apply with --probes: the vectors then average the probe rows only")
    cells = []
    for router in ("paper", "mixtral", "deepseek-v3"):
        for lr in [float(scale) * BASE_LR for scale in lr_scales.split(",")]:
            weightings = ("uniform",) if probes else ("uniform", "router")  # probes: rows weigh |p|
            ema = [(w, b) for w in weightings for b in (0.9, 0.99)] if router == "paper" else [("uniform", 0.9)]
            for weighting, beta in ema:
                name = f"{router} lr={lr:g}" + (f" {weighting} b={beta}" if router == "paper" else "")
                name += f" stride={stats_stride}" if stats_stride != 1 else ""
                name += f" probes={probes}" if probes else ""
                cells.append(dict(name=name, router=router, lr=lr, weighting=weighting, beta=beta,
                                  stride=stats_stride, **(probe_flags(probes) if probes else {})))
    if quick:
        return [cells[0], next(c for c in cells if c["router"] == "mixtral")]
    return cells


def size_flags(args):
    flags = list(SIZES["quick" if args.quick else "default"])
    if args.steps:
        flags[flags.index("--steps") + 1] = str(args.steps)
    return flags


def fingerprint(flags) -> str:
    """Runs are reused only if they were made with the same model / run settings."""
    return hashlib.sha1(" ".join(flags).encode()).hexdigest()[:10]


def count_spikes(losses, warmup, factor=SPIKE_FACTOR):
    """(spikes, worst ratio): steps after ``warmup`` whose loss exceeds ``factor`` x the running
    minimum of all steps before it, or is not finite (divergence: worst ratio inf; steps are
    1-based; ``losses[0]`` is step 1)."""
    spikes, worst, running_min = 0, 0.0, math.inf
    for step, loss in enumerate(losses, 1):
        if step > warmup and running_min < math.inf:
            ratio = loss / running_min if math.isfinite(loss) else math.inf
            worst = max(worst, ratio)
            spikes += not ratio <= factor
        running_min = min(running_min, loss)
    return spikes, worst


def t_interval(values):
    """(mean, half-width of the two-sided 95% Student-t interval); half-width nan for n < 2."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = T975[n - 2] if n - 1 <= len(T975) else 1.96
    return mean, t * sd / math.sqrt(n)


def summarise(cell, runs):
    """Per-cell numbers from its runs (one per seed)."""
    diffs = [r["valid_default"] - r["valid_topk"] for r in runs]
    mean, half = t_interval(diffs)
    return {
        "cell": cell["name"], "router": cell["router"], "lr": cell["lr"], "weighting": cell["weighting"],
        "beta": cell["beta"], "seeds": len(runs),
        "valid_topk": sum(r["valid_topk"] for r in runs) / len(runs),
        "valid_default": sum(r["valid_default"] for r in runs) / len(runs),
        "diff_mean": mean, "diff_ci95": half, "diff_lo": mean - half, "diff_hi": mean + half,
        "wins": sum(d < 0 for d in diffs),
        "spikes_topk": sum(r["spikes_topk"] for r in runs), "spikes_default": sum(r["spikes_default"] for r in runs),
    }


def verdict(s):
    if not s["seeds"] > 1 or math.isnan(s["diff_ci95"]):
        return "n/a"
    if s["diff_hi"] < 0:
        return "Default better"
    if s["diff_lo"] > 0:
        return "TopK better"
    return "no difference"


def table(summaries):
    head = (f"{'cell':<32} {'n':>2} {'valid TopK':>10} {'valid Dflt':>10} {'Dflt-TopK [95% CI]':>27} "
            f"{'wins':>5} {'spikes T/D':>10}  verdict")
    rows = [head, "-" * len(head)]
    for s in summaries:
        ci = f"{s['diff_mean']:+.4f} [{s['diff_lo']:+.4f}, {s['diff_hi']:+.4f}]"
        rows.append(f"{s['cell']:<32} {s['seeds']:>2} {s['valid_topk']:>10.4f} {s['valid_default']:>10.4f} "
                    f"{ci:>27} {s['wins']:>2}/{s['seeds']:<2} {s['spikes_topk']:>4}/{s['spikes_default']:<5}  "
                    f"{verdict(s)}")
    return "\n".join(rows)


def plot(summaries, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.45 * len(summaries) + 1.5))
    ys = list(range(len(summaries)))[::-1]
    err = [0 if math.isnan(s["diff_ci95"]) else s["diff_ci95"] for s in summaries]
    colors = ["tab:green" if s["diff_hi"] < 0 else "tab:red" if s["diff_lo"] > 0 else "tab:gray" for s in summaries]
    for y, s, e, c in zip(ys, summaries, err, colors):
        ax.errorbar(s["diff_mean"], y, xerr=e, fmt="o", color=c, capsize=4)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(ys, [f"{s['cell']} ({s['wins']}/{s['seeds']} wins)" for s in summaries], fontsize=8)
    ax.set_xlabel("final valid loss, Default MoE - TopK (nats/byte), mean and 95% CI over seeds")
    ax.set_title("Paired runs: below 0 = Default MoE better")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- results file ----------------------------------------------------------------------------------
def load_runs(path):
    """Finished runs of ``path`` (JSON lines; a torn last line from a kill is skipped)."""
    runs = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    runs.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return runs


def append_run(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


# -- the sweep (orchestrator) ----------------------------------------------------------------------
def launch(args, spec, on_line):
    """One torchrun launch of this script as a worker; ``on_line`` sees rank 0's stdout lines."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           os.path.abspath(__file__), "--worker", spec["kind"], "--spec", json.dumps(spec)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    with open(os.path.join(args.out, "worker.log"), "a") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        for line in proc.stdout:
            on_line(line.rstrip("\n"))
        if proc.wait() != 0:
            raise SystemExit(f"worker failed (exit {proc.returncode}); see {log.name}")


def progress(total, initial):
    try:
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, ncols=100, file=sys.stdout, unit="run")
    except ImportError:  # plain lines
        class Bar:
            n = initial

            def update(self, k):
                self.n += k
                print(f"{self.n}/{total} runs", flush=True)

            def set_postfix_str(self, s):
                pass

            def write(self, s):
                print(s, flush=True)

            def close(self):
                pass

        return Bar()


def sweep(args):
    os.makedirs(args.out, exist_ok=True)
    flags = size_flags(args)
    fp = fingerprint(flags)
    path = os.path.join(args.out, "runs.jsonl")
    if "," in args.probes:
        raise SystemExit("--probes: the sweep takes one setting (several are for --fidelity)")
    cells = [c for c in grid(args.quick, args.stats_stride, args.probes, args.lr_scales) if re.search(args.cells, c["name"])]
    seeds = list(range(1, args.seeds + 1))
    done = {(r["cell"], r["seed"]) for r in load_runs(path) if r.get("fingerprint") == fp}
    todo = [(c, [s for s in seeds if (c["name"], s) not in done]) for c in cells]
    total = len(cells) * len(seeds)
    print(f"{len(cells)} cells x {len(seeds)} seeds; {total - sum(len(s) for _, s in todo)} runs reused "
          f"from {path}; model: {' '.join(flags)}", flush=True)
    bar = progress(total, total - sum(len(s) for _, s in todo))
    t0 = time.time()

    def on_line(line):
        if line.startswith("RUN "):
            bar.update(1)
            bar.write(line[4:])
        elif line.strip():
            bar.write(line)

    # seed-major order: a sweep stopped early still has every cell at the first seeds
    jobs = [dict(cell=c, seeds=[seed]) for seed in seeds for c, s in todo if seed in s]
    if jobs and not args.report_only:  # one torchrun launch for all missing runs
        launch(args, dict(kind="cell", jobs=jobs, flags=flags, fingerprint=fp,
                          results=os.path.abspath(path), out=os.path.abspath(args.out)), on_line)
    bar.close()
    runs = [r for r in load_runs(path) if r.get("fingerprint") == fp]
    summaries = []
    for cell in cells:
        mine = sorted((r for r in runs if r["cell"] == cell["name"] and r["seed"] in seeds), key=lambda r: r["seed"])
        if mine:
            summaries.append(summarise(cell, mine))
    print(f"\nFinal valid loss (nats/byte), paired over seeds; spikes: train steps after warm-up above "
          f"{SPIKE_FACTOR}x the running minimum, summed over seeds. Sweep time {time.time() - t0:.0f} s.")
    print(table(summaries))
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"model_flags": flags, "fingerprint": fp, "cells": summaries}, f, indent=1)
    if not args.no_plot and summaries:
        plot(summaries, os.path.join(args.out, "paired_diff.png"))
        print(f"Wrote {args.out}/summary.json, {args.out}/paired_diff.png")
    return summaries


# -- workers (under torchrun) ------------------------------------------------------------------------
def unless_default(flag, value):
    """``[flag, value]``, or nothing where ``value`` is None (``--probes default``: the family's default)."""
    return [] if value is None else [flag, str(value)]


def demo_args(flags, cell, seed, out):
    import cpu_demo

    return cpu_demo.parse_args(flags + [
        "--router", cell["router"], "--topk", str(TOPK[cell["router"]]), "--lr", str(cell["lr"]),
        "--moe-default-ema-weighting", cell["weighting"], "--moe-default-ema-beta", str(cell["beta"]),
        "--moe-default-stats-stride", str(cell.get("stride", 1)),
        *unless_default("--moe-default-probes", cell.get("moe_default_probes", 0)),
        "--moe-default-probe-draw", cell.get("moe_default_probe_draw", "uniform"),
        *unless_default("--moe-default-fit", cell.get("moe_default_fit", "constant")),
        *(["--moe-default-fit-beta", str(cell["moe_default_fit_beta"])] if cell.get("moe_default_fit_beta") is not None
          else []),
        "--seed", str(seed), "--out", out,
        "--no-plot", "--no-diagnostics"])


def new_runs(d, variants=None):
    """TopK plus Default MoE models (one per ``variants`` entry of demo args), identical weights."""
    import cpu_demo

    runs = [cpu_demo.Run("TopK", d, default_moe=False)]
    for name, v in (variants or [("Default MoE", d)]):
        runs.append(cpu_demo.Run(name, v, default_moe=True))
    state = runs[0].module.state_dict()
    for run in runs[1:]:
        mine = dict(state)
        mine.update({k: v for k, v in run.module.state_dict().items() if k.endswith("default_vectors")})
        run.module.load_state_dict(mine)
    return runs


def prepare_data(d, device):
    """The demo's data with a fixed corpus (seed 0): seeds change init and sample order only."""
    import torch

    import cpu_demo
    from megatron_default_moe.testing.data import write_byte_corpus

    if cpu_demo.is_rank0():
        write_byte_corpus(os.path.join(d.out, "data", f"pystdlib_bytes_{d.corpus_bytes}"), d.corpus_bytes, seed=0)
    torch.distributed.barrier()
    return cpu_demo.load_data(d, device)


def cell_worker(spec):
    """All ``spec["jobs"]`` (cell, seeds) in this launch; rank 0 appends one record per run."""
    import torch

    import cpu_demo

    ep = None
    for job in spec["jobs"]:
        for seed in job["seeds"]:
            d = demo_args(spec["flags"], job["cell"], seed, spec["out"])
            if ep is None:
                device = cpu_demo.setup_parallel(d)
                ep = d.ep
            d.ep = ep
            record = paired_run(d, job["cell"], seed, device)
            if cpu_demo.is_rank0():
                record["fingerprint"] = spec["fingerprint"]
                append_run(spec["results"], record)
                print(f"RUN {record['cell']} seed {seed}: valid TopK {record['valid_topk']:.4f} Default "
                      f"{record['valid_default']:.4f} ({record['valid_default'] - record['valid_topk']:+.4f}), "
                      f"spikes {record['spikes_topk']}/{record['spikes_default']}, {record['seconds']:.0f} s",
                      flush=True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def paired_run(d, cell, seed, device):
    """Train TopK and Default MoE in lockstep on the same batches; the run's record."""
    import torch

    import cpu_demo
    from megatron.core import parallel_state

    t0 = time.time()
    train, valid = prepare_data(d, device)
    runs = new_runs(d)
    per_step = d.micro_batch * d.micro_batches * parallel_state.get_data_parallel_world_size()
    valid_batches = cpu_demo.micro_batches(valid, 0, d.eval_iters, d, device)
    for step in range(1, d.steps + 1):
        batches = cpu_demo.micro_batches(train, (step - 1) * per_step, d.micro_batches, d, device)
        for run in runs:
            run.train_step(batches)
    valid_loss = [run.evaluate(valid_batches) for run in runs]
    warmup = min(d.warmup, d.steps // 5)  # the demo's LR warm-up
    spikes = [count_spikes(run.train_loss, warmup) for run in runs]
    return dict(cell=cell["name"], seed=seed, router=cell["router"], lr=cell["lr"], weighting=cell["weighting"],
                beta=cell["beta"], topk=d.topk, valid_topk=valid_loss[0], valid_default=valid_loss[1],
                spikes_topk=spikes[0][0], spikes_default=spikes[1][0],
                worst_ratio_topk=spikes[0][1], worst_ratio_default=spikes[1][1],
                train_topk=runs[0].train_loss, train_default=runs[1].train_loss,
                seconds=time.time() - t0, world_size=torch.distributed.get_world_size())


def main():
    args = parse_args()
    if args.worker:
        import cpu_demo

        cpu_demo.quiet()
        spec = json.loads(args.spec)
        if args.worker == "cell":
            cell_worker(spec)
        else:
            import fidelity

            fidelity.fidelity_worker(spec)
        return
    if args.fidelity:
        import fidelity

        fidelity.fidelity(args)
        return
    sweep(args)


if __name__ == "__main__":
    main()
