"""The runs of one layout and router family: Default MoE per dispatcher, update mode (and estimator),
and the stock baseline per dispatcher (Megatron's ``MoELayer``: it has no update mode), each
trained with ``train`` and measured with ``compare`` against its own one-rank run, judged by
``verdict``."""

import time

import torch

from megatron_default_moe.check import compare, runtime, verdict
from megatron_default_moe.check.model import LAYOUTS, build_stage
from megatron_default_moe.check.train import estimators_of, train


def log(*args):
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(*args, flush=True)


def measure(setup, ref, sizes, router, dispatcher, update, estimator="default", baseline=None) -> compare.Deviations:
    """Train one run of this layout and measure it at every step, reduced over every rank.
    ``baseline``: this dispatcher's stock run (``update`` "stock" runs it)."""
    sp, stock = sizes.get("sp", False), update == "stock"
    stage = build_stage(setup, dispatcher, "microbatch" if stock else update, sizes, ref["weights"], router,
                        estimator, stock)  # fmt: skip
    expected = ref["stock"][router] if stock else ref["runs"][router, update, estimator]
    devs = compare.Deviations()

    def on_step(step, *step_data):
        if not stock:
            devs.failures += [f"step {step}: {msg}" for msg in compare.identical_across_ranks(stage)]
        compare.measure_step(stage, expected[step], step_data, sp, devs, step)

    train(setup, stage, sp, on_step)
    devs.reduce(setup.device, baseline)
    return devs


def flips_note(default, stock) -> str:
    """``; routing flips ...`` when Default's run (or stock's) flipped a routing decision."""
    if not default.flips.any() and (stock is None or not stock.flips.any()):
        return ""
    parts = []
    for who, devs in (("stock", stock), ("default", default)):
        steps = [] if devs is None else devs.flips.sum((1, 2)).tolist()
        parts += [f"{who} {int(n)} at step {s}" for s, n in enumerate(steps) if n]
    same = [s for s, n in enumerate(default.flips.sum((1, 2)).tolist()) if n and default.same_flips[s]]
    return "; routing flips: " + ", ".join(parts) + (f" (step {same[0]}: the same tokens)" if same else "")


def check_layout(setup, ref, name, router, args, tolerance):
    """Every dispatcher and update mode of one layout and router: table rows, failure messages."""
    sizes, rows, failures, baselines = LAYOUTS[name], [], [], {}
    rank = torch.distributed.get_rank()
    runtime.init_layout(setup, sizes)
    try:
        estimators = estimators_of(router, args.routed_rows)
        runs = [(d, u, e) for d in args.dispatchers for u in args.updates for e in estimators]
        for dispatcher, update, estimator in runs:
            if args.baseline and dispatcher not in baselines:
                start = time.time()
                baselines[dispatcher] = measure(setup, ref, sizes, router, dispatcher, "stock")
                log(f"stock {name}:{router}/{dispatcher} ({time.time() - start:.1f}s)")
            label, stock = update + ("+rows" if estimator == "routed-rows" else ""), baselines.get(dispatcher)
            tag, start = f"{name}:{router}/{dispatcher}/{label}", time.time()
            devs = measure(setup, ref, sizes, router, dispatcher, update, estimator, stock)
            ok, messages, compared = verdict.judge(devs, stock, setup.dtype, tolerance)
            failures += [f"rank {rank} {tag} {msg}" for msg in messages]
            seconds = time.time() - start
            rows.append((name, router, dispatcher, label, ok, devs, stock, compared, seconds))
            log(f"{'ok  ' if ok else 'FAIL'} {tag} ({seconds:.1f}s{flips_note(devs, stock)})")
    finally:
        runtime.destroy_layout()
    return rows, failures
