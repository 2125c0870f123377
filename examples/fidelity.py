"""Per-layer fidelity over training: how close each router gradient is to the dense one, per MoE
layer and router family, and what richer default vectors could reach (``DESIGN.md`` §1.7).

    python examples/experiments.py --fidelity --router mixtral --probes 64,256 --steps 300

TopK and Default MoE variants (today's EMA, one per probe budget) train in lockstep from one seed
on the same batches (``cpu_demo``'s machinery, torchrun, 2 ranks, EP = 2). At six checkpoints, on
one validation micro-batch, per MoE layer:

- router-gradient cosines to dense: the TopK model's own (``T``), TopK's on the base Default
  model (``T|D``: same model and batch), each Default variant's; the vectors' bias;
- ``O_u`` / ``O_c``: the base model with ``Ê`` set to the exact in-batch unchosen / chosen mean;
- richer defaults (``default_oracles``): a constant, per-top-1 or rank-r linear ``V_{t,i}`` fitted
  on another validation micro-batch, the exact outputs (cosine 1: a check), and for every variant
  the term shrunk toward TopK by the best ``α`` (from the Gram matrix of T, D and dense).

Results: ``<out>/fidelity_<router>.json`` (a killed run keeps every finished checkpoint), a table
(``fidelity_table``, ``richer_table``) and a plot.
"""

import json
import os
import time

from experiments import SIZES, TOPK, launch, new_runs, prepare_data, probe_flags

_EMA = dict(moe_default_probes=0, moe_default_fit="constant")  # the paper's EMA of the routed rows
FIDELITY_VARIANTS = [("uniform b=0.9", dict(_EMA, moe_default_ema_weighting="uniform", moe_default_ema_beta=0.9)),
                     ("router b=0.9", dict(_EMA, moe_default_ema_weighting="router", moe_default_ema_beta=0.9)),
                     ("uniform b=0.99", dict(_EMA, moe_default_ema_weighting="uniform", moe_default_ema_beta=0.99))]


def fidelity_variants(probes: str):
    """Today's Default MoE, then one variant per probe budget (``--probes 32,128,128w,64s,64s@0.99``:
    a 'w' draws weighted, an 's' fits ``shared-1``, '@β' sets its ``--moe-default-fit-beta``);
    without budgets, the EMA variants above."""
    if not probes:
        return FIDELITY_VARIANTS
    return FIDELITY_VARIANTS[:1] + [(f"probes {spec}", probe_flags(spec)) for spec in probes.split(",")]


def fidelity(args):
    """The demo's model (paper router, seed 1234): TopK and three Default MoE variants in lockstep;
    per checkpoint and MoE layer, router-gradient cosines and the default vectors' bias."""
    os.makedirs(args.out, exist_ok=True)
    steps = args.steps or (6 if args.quick else 300)
    flags = (SIZES["quick"] if args.quick else []) + ["--steps", str(steps)]
    flags += ["--router", args.router, "--topk", str(TOPK[args.router]), "--seed", str(args.fidelity_seed)]
    name = "fidelity" if args.router == "paper" and not args.probes else f"fidelity_{args.router}"
    name += f"_seed{args.fidelity_seed}" if args.fidelity_seed != 1234 else ""
    spec = dict(kind="fidelity", flags=flags, interval=max(1, steps // 6), out=os.path.abspath(args.out),
                results=os.path.abspath(os.path.join(args.out, name + ".json")), probes=args.probes)
    launch(args, spec, lambda line: print(line, flush=True))
    with open(spec["results"]) as f:
        result = json.load(f)
    print(fidelity_table(result))
    if any("richer" in m for m in result["history"][result["variants"][0][0]].values()):
        print(richer_table(result))
    if not args.no_plot:
        plot_fidelity(result, os.path.join(args.out, name + ".png"))
        print(f"Wrote {spec['results']}, {args.out}/{name}.png")


def _forward_fn(batch):
    return lambda model: model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])


def _loss_fn(batch):
    def loss_fn(model):
        per_token = _forward_fn(batch)(model)
        return (per_token * batch["loss_mask"]).sum() / batch["loss_mask"].sum()

    return loss_fn


def _measure(run, batch, oracle, fit_batch):
    """Cosines, the Gram matrix of (TopK, Default, dense) router gradients and the bias of one model
    on one micro-batch; with ``oracle``, also the Default cosine with Ê replaced by the exact mean
    output on the tokens that did not / did choose each expert, and the richer defaults' Grams
    (fitted on ``fit_batch``)."""
    import torch

    import cpu_demo
    from megatron_default_moe import default_moe_layers
    from megatron_default_moe.analysis.default_oracles import richer_default_ceilings
    from megatron_default_moe.analysis.oracle_fits import gram_of
    from megatron_default_moe.analysis.diagnostics import cosine, router_gradient_triples
    from megatron_default_moe.analysis.vector_quality import default_vector_bias, expert_output_moments

    forward = _forward_fn(batch)
    triples = router_gradient_triples(run.module, _loss_fn(batch))
    out = {"cos": {k: {"topk": cosine(t, g), "default": None if d is None else cosine(d, g)}
                   for k, (t, d, g) in triples.items()}}
    layers = default_moe_layers(run.module)
    if not layers:
        return out
    out["gram"] = {k: gram_of(t, d, g) for k, (t, d, g) in triples.items() if d is not None}
    out["bias"] = default_vector_bias(run.module, forward)
    if oracle:
        moments = expert_output_moments(run.module, forward)
        saved = [layer.default_vectors.clone() for layer in layers]
        for name, key in (("oracle_unchosen", "unchosen_mean"), ("oracle_chosen", "chosen_mean")):
            for layer, m in zip(layers, moments.values()):
                layer.default_vectors.copy_(m[key].float())
            out[name] = {k: v["default"] for k, v in cpu_demo.measure_cosines(run, batch).items()}
            for layer, v in zip(layers, saved):
                layer.default_vectors.copy_(v)
        out["richer"] = richer_default_ceilings(run.module, _loss_fn(batch), _forward_fn(fit_batch), forward)
    layer_ratio = {}
    for layer in layers:
        layer.track_metrics = True
    run.model.eval()
    with torch.no_grad():
        forward(run.module)
    run.model.train()
    for layer in layers:
        layer.track_metrics = False
        layer_ratio[layer.layer_number] = float(layer.last_term_norm_ratio)
    out["term_ratio"] = layer_ratio
    return out


def fidelity_worker(spec):
    import copy

    import torch

    import cpu_demo
    from megatron.core import parallel_state

    d = cpu_demo.parse_args(spec["flags"] + ["--out", spec["out"], "--no-plot"])
    device = cpu_demo.setup_parallel(d)
    train, valid = prepare_data(d, device)
    variants = []
    for name, overrides in fidelity_variants(spec.get("probes", "")):
        v = copy.copy(d)
        vars(v).update(overrides)
        variants.append((name, v))
    runs = new_runs(d, variants)
    per_step = d.micro_batch * d.micro_batches * parallel_state.get_data_parallel_world_size()
    valid_batches = cpu_demo.micro_batches(valid, 0, d.eval_iters, d, device)
    history = {run.name: {} for run in runs}
    t0 = time.time()
    for step in range(0, d.steps + 1):
        if step:
            batches = cpu_demo.micro_batches(train, (step - 1) * per_step, d.micro_batches, d, device)
            for run in runs:
                run.train_step(batches)
        if step % spec["interval"] == 0 or step == d.steps:
            for i, run in enumerate(runs):
                m = _measure(run, valid_batches[0], oracle=i == 1, fit_batch=valid_batches[-1])
                m["valid"] = run.evaluate(valid_batches)
                history[run.name][step] = m
            cpu_demo.log(f"step {step}: " + ", ".join(f"{r.name} {history[r.name][step]['valid']:.4f}" for r in runs)
                         + f" ({time.time() - t0:.0f} s)")
            if cpu_demo.is_rank0():  # after every checkpoint: a killed run keeps what it measured
                with open(spec["results"] + ".tmp", "w") as f:
                    json.dump({"args": vars(d), "variants": fidelity_variants(spec.get("probes", "")),
                               "history": history}, f, indent=1)
                os.replace(spec["results"] + ".tmp", spec["results"])
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def fidelity_table(result):
    """Per checkpoint and MoE layer: cosines to dense, bias, and oracle cosines."""
    h = result["history"]
    names = [n for n, *_ in result["variants"]]
    base = names[0]
    steps = sorted(h["TopK"], key=int)
    layers = sorted(h[base][steps[-1]]["bias"], key=int)
    rows = ["Router-gradient cosine to dense, per MoE layer. T = TopK model; T|D = TopK's gradient on the base "
            "Default model (its gradient minus the default term's: same model and batch); per Default variant, "
            "its own gradient; O_u / O_c = the base variant with Ê set to the exact mean expert output over the "
            "tokens that did not / did choose each expert (oracles). bias = ‖Ê_i − u_i‖ / spread_i, "
            "gap = ‖c_i − u_i‖ / spread_i (u, c: unchosen / chosen means), |term|/|out| of the base variant."]
    for layer in layers:
        rows.append(f"\nMoE layer {layer}")
        head = (f"{'step':>5} {'T':>6} {'T|D':>6} " + " ".join(f"{n:>15}" for n in names)
                + f" {'O_u':>6} {'O_c':>6} | " + " ".join(f"{'bias ' + n[-9:]:>15}" for n in names)
                + f" {'gap':>6} {'term':>6}")
        rows += [head, "-" * len(head)]
        for s in steps:
            b = h[base][s]
            cells = [f"{h['TopK'][s]['cos'][layer]['topk']:>6.3f}", f"{b['cos'][layer]['topk']:>6.3f}"]
            cells += [f"{h[n][s]['cos'][layer]['default']:>15.3f}" for n in names]
            cells += [f"{b['oracle_unchosen'][layer]:>6.3f}", f"{b['oracle_chosen'][layer]:>6.3f}", "|"]
            cells += [f"{h[n][s]['bias'][layer]['bias']:>15.2f}" for n in names]
            cells += [f"{b['bias'][layer]['selection_gap']:>6.2f}", f"{b['term_ratio'][layer]:>6.2f}"]
            rows.append(f"{int(s):>5} " + " ".join(cells))
    rows.append("\nvalid loss at the end: " + ", ".join(f"{n} {h[n][steps[-1]]['valid']:.4f}" for n in h))
    later = [s for s in steps if int(s) > 0]
    rows.append(f"\nMeans over steps {later[0]}-{later[-1]} (cosine to dense; bias):")
    for layer in layers:
        mean = lambda f: sum(f(s) for s in later) / len(later)  # noqa: E731
        cells = [f"T {mean(lambda s: h['TopK'][s]['cos'][layer]['topk']):.3f}",
                 f"T|D {mean(lambda s: h[base][s]['cos'][layer]['topk']):.3f}"]
        cells += [f"{n} {mean(lambda s: h[n][s]['cos'][layer]['default']):.3f} "
                  f"({mean(lambda s: h[n][s]['bias'][layer]['bias']):.2f})" for n in names]
        cells += [f"O_u {mean(lambda s: h[base][s]['oracle_unchosen'][layer]):.3f}",
                  f"O_c {mean(lambda s: h[base][s]['oracle_chosen'][layer]):.3f}"]
        rows.append(f"  layer {layer}: " + ", ".join(cells))
    return "\n".join(rows)


def _gram_cos(gram, alpha=1.0):
    from megatron_default_moe.analysis.oracle_fits import shrunk_cosine

    return shrunk_cosine(gram, alpha)


def richer_table(result):
    """Per MoE layer, means over the checkpoints after step 0: the router-gradient cosine to dense
    of TopK, today's Default and the probe variants, each also shrunk toward TopK by its best α
    (mean α* in brackets), and of the richer-default candidates on the base model."""
    from megatron_default_moe.analysis.oracle_fits import CANDIDATES, shrink_ceiling

    h = result["history"]
    names = [n for n, *_ in result["variants"]]
    base = names[0]
    steps = [s for s in sorted(h[base], key=int) if int(s) > 0 and "richer" in h[base][s]]
    if not steps:
        return ""
    layers = sorted(h[base][steps[-1]]["richer"]["constant"], key=int)
    mean = lambda f: sum(f(s) for s in steps) / len(steps)  # noqa: E731
    label = {n: "today" if n == base else n for n in names}
    head = (f"{'layer':>5} {'T':>6} {'T|D':>6} " + " ".join(f"{label[n]:>12} {'+shrink (α)':>13}" for n in names)
            + " " + " ".join(f"{c:>14}" for c in CANDIDATES) + f" {'const+shrink':>13}")
    rows = [f"Richer defaults, means over steps {steps[0]}-{steps[-1]}: router-gradient cosine to dense. Per "
            "variant its own gradient and the term shrunk toward TopK by the best α in [0, 1] (mean α*); "
            "candidates on the base model, fitted on another validation micro-batch (exact: a check, 1.000), "
            "in brackets ‖V − E(x)‖ / ‖u − E(x)‖ over the unchosen pairs.",
            head, "-" * len(head)]
    for layer in layers:
        cells = [f"{mean(lambda s: h['TopK'][s]['cos'][layer]['topk']):>6.3f}",
                 f"{mean(lambda s: h[base][s]['cos'][layer]['topk']):>6.3f}"]
        for n in names:
            best = [shrink_ceiling(h[n][s]["gram"][layer]) for s in steps]
            cells.append(f"{mean(lambda s: _gram_cos(h[n][s]['gram'][layer])):>12.3f}")
            cells.append(f"{sum(c for _, c in best) / len(best):>6.3f} ({sum(a for a, _ in best) / len(best):.2f})")
        cells += [f"{mean(lambda s: _gram_cos(h[base][s]['richer'][c][layer])):>6.3f} "
                  f"({mean(lambda s: h[base][s]['richer'][c][layer].get('fit_error', float('nan'))):>5.2f})"
                  for c in CANDIDATES]
        best = [shrink_ceiling(h[base][s]["richer"]["constant"][layer]) for s in steps]
        cells.append(f"{sum(c for _, c in best) / len(best):>6.3f} ({sum(a for a, _ in best) / len(best):.2f})")
        rows.append(f"{int(layer):>5} " + " ".join(cells))
    return "\n".join(rows)


def plot_fidelity(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = result["history"]
    variants = [n for n, *_ in result["variants"]]
    base = variants[0]
    steps = sorted(h["TopK"], key=int)
    layers = sorted(h[base][steps[-1]]["bias"], key=int)
    x = [int(s) for s in steps]
    fig, axes = plt.subplots(2, len(layers), figsize=(4 * len(layers), 6.5), squeeze=False, sharex=True)
    for j, layer in enumerate(layers):
        ax = axes[0][j]
        ax.plot(x, [h["TopK"][s]["cos"][layer]["topk"] for s in steps], "k--", label="TopK model")
        for n in variants:
            ax.plot(x, [h[n][s]["cos"][layer]["default"] for s in steps], "-", marker=".", label=f"Default {n}")
        ax.plot(x, [h[base][s]["oracle_unchosen"][layer] for s in steps], ":", marker="x", label="oracle Ê = unchosen mean")
        ax.set_title(f"MoE layer {layer}: cosine to dense")
        ax.grid(alpha=0.3)
        ax = axes[1][j]
        for n in variants:
            ax.plot(x, [h[n][s]["bias"][layer]["bias"] for s in steps], "-", marker=".", label=f"bias {n}")
        ax.plot(x, [h[base][s]["bias"][layer]["selection_gap"] for s in steps], "k:", label="selection gap")
        ax.set_title(f"MoE layer {layer}: ‖Ê−u‖/spread")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    axes[1][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


