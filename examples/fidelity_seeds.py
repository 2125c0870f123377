#!/usr/bin/env python
"""Fidelity over seeds: one Default MoE variant against TopK per family and MoE layer, from the
``--fidelity`` runs' JSON files (``examples/fidelity.py``).

    python examples/fidelity_seeds.py docs/fit16/fidelity_*.json --variant "probes 64s"

Per file (one family and seed), the mean router-gradient cosine to dense over the checkpoints
after step 0, per MoE layer, of:

- ``T``: the TopK model's own gradient (a separate model: the per-model view);
- ``T|V``: TopK's gradient on the variant's own model and batch (its gradient minus its default
  term's: the same-model view, paired, free of the two models' different trajectories);
- ``T|D``: TopK's gradient on the base Default model (today's EMA), ``today`` that model's own;
- the variant's own gradient, and ``O_u`` (the base model with the exact unchosen mean).

Then, per family and layer, the means over seeds and in how many seeds the variant was at or
above ``T|V`` (same model) and at or above both ``T`` and ``T|D`` (per model, the earlier tables'
test), and a last line counting layer-runs.
"""

import argparse
import json
import statistics
from collections import defaultdict


def run_means(result, variant):
    """``{layer: {view: mean cosine over the checkpoints after step 0}}`` of one run."""
    h = result["history"]
    base = result["variants"][0][0]
    if variant not in h:
        raise SystemExit(f"--variant {variant!r} is not in this run (it has {sorted(h)})")
    later = [s for s in h["TopK"] if int(s) > 0]
    views = {
        "T": lambda s, l: h["TopK"][s]["cos"][l]["topk"],
        "T|V": lambda s, l: h[variant][s]["cos"][l]["topk"],
        "T|D": lambda s, l: h[base][s]["cos"][l]["topk"],
        "today": lambda s, l: h[base][s]["cos"][l]["default"],
        "V": lambda s, l: h[variant][s]["cos"][l]["default"],
        "O_u": lambda s, l: h[base][s]["oracle_unchosen"][l],
    }
    layers = sorted(h[base][later[-1]]["cos"], key=int)
    return {l: {v: statistics.fmean(f(s, l) for s in later) for v, f in views.items()} for l in layers}


def seeds_table(results, variant, markdown=False):
    """The per-family, per-layer table over seeds (text, or a Markdown table)."""
    by_family, skipped = defaultdict(list), []
    for r in results:
        if any(int(s) > 0 for s in r["history"]["TopK"]):
            by_family[r["args"]["router"]].append((r["args"]["seed"], run_means(r, variant)))
        else:  # a run still at its first checkpoint
            skipped.append(f"{r['args']['router']} seed {r['args']['seed']}")
    views = ("T", "T|V", "T|D", "today", "V", "O_u")
    if markdown:
        rows = ["| family | layer | seeds | " + " | ".join(v.replace("|", "\\|") for v in views)
                + " | V ≥ T\\|V | V ≥ T, T\\|D |", "|" + " --- |" * (len(views) + 5)]
    else:
        head = (f"{'family':<12} {'layer':>5} {'seeds':>5} " + " ".join(f"{v:>6}" for v in views)
                + f"  {'V>=T|V':>7} {'V>=T,T|D':>8}")
        rows = [f"Variant V = {variant!r}: mean cosine to dense over seeds", head, "-" * len(head)]
    same = per_model = total = layers = layers_on_mean = 0
    for family, runs in sorted(by_family.items()):
        for layer in runs[0][1]:
            m = [means[layer] for _, means in runs]
            mean = {v: statistics.fmean(x[v] for x in m) for v in views}
            wins_same = sum(x["V"] >= x["T|V"] for x in m)
            wins_model = sum(x["V"] >= max(x["T"], x["T|D"]) for x in m)
            same, per_model, total = same + wins_same, per_model + wins_model, total + len(m)
            layers, layers_on_mean = layers + 1, layers_on_mean + (mean["V"] >= max(mean["T"], mean["T|V"], mean["T|D"]))
            if markdown:
                rows.append(f"| {family} | {layer} | {len(m)} | " + " | ".join(f"{mean[v]:.2f}" for v in views)
                            + f" | {wins_same}/{len(m)} | {wins_model}/{len(m)} |")
            else:
                rows.append(f"{family:<12} {layer:>5} {len(m):>5} " + " ".join(f"{mean[v]:>6.3f}" for v in views)
                            + f"  {wins_same:>3}/{len(m):<3} {wins_model:>4}/{len(m):<3}")
    rows.append(f"\nlayer-runs at or above TopK: same model (V >= T|V) {same}/{total}; "
                f"per model (V >= T and T|D) {per_model}/{total}; layers whose mean over seeds is at or above "
                f"all three TopK means: {layers_on_mean}/{layers}")
    rows += [f"(no checkpoint after step 0 yet: {', '.join(skipped)})"] if skipped else []
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+", help="fidelity_<router>[_seed<N>].json files")
    p.add_argument("--variant", default="probes 64s", help="the Default MoE variant to compare (a run's name)")
    p.add_argument("--markdown", action="store_true", help="a Markdown table (the README's)")
    args = p.parse_args(argv)
    results = []
    for path in args.files:
        with open(path) as f:
            results.append(json.load(f))
    print(seeds_table(results, args.variant, args.markdown))


if __name__ == "__main__":
    main()
