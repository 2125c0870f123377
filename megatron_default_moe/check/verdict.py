"""The check's verdict on one run, from the deviations ``compare`` measured, and its table.

A run passes when the default vectors are bit-identical on every rank of the stage at every step
(exact, in any dtype), and for each quantity ``q`` (a layer's output of one micro-batch, a layer's
expert or router gradients, a layer's default vectors) at every step where it is compared:

- fp32, every step, flips or not: ``dev_default(q) <= tolerance`` (1e-5 on CPU, 1e-4 on CUDA for
  TF32 GEMMs), today's standard;
- with the stock baseline, any dtype: ``dev_default(q) <= FACTOR · dev_stock(q) + tolerance``
  (bf16: 3e-2), ``dev_stock`` of the same quantity, layer, micro-batch and step (the vectors,
  which stock lacks, against stock's outputs of that layer: they are means of the same experts'
  outputs); without it (``--no-baseline``), bf16 too by the tolerance alone.

``dev`` is the largest relative error against the run's own one-rank run over every rank.
Stock and Default run the same arithmetic (router, dispatch, experts, combine, the same
reductions) but for the default term, so where a layout's rounding moves stock it moves Default
by the same order; the factor 2 allows for the trajectories parting after the first update (the
default term changes the router's), the tolerance for what stock may not show at all (fp32
rounding where stock deviates ~0, bf16's ulp where it deviates less). A Default MoE bug (statistics
over the wrong group, a wrong EMA, a lost wait) moves vectors, outputs or router gradients well
past that on layouts where stock does not move.

Routing flips. In bf16 a token near a routing tie can change experts on rounding alone (the one-rank
and the layout's router inputs differ by bf16 partial sums); it then moves its output by a whole
expert output, every gradient of its step, and after the update the parameters, so the
comparison downstream says nothing about Default's arithmetic. ``compare`` counts flips (Megatron's
routing map against the one-rank run's). A quantity is compared (in bf16) when it is upstream of
every flip of Default's run: no flip at an earlier step; at its step none in its layer or an
earlier one (outputs: at its micro-batch or an earlier one; gradients: none in the step). At a step
whose flips are stock's, token for token (same weights, a backward-only router: the same forward),
everything of that step is compared, like with like. Later steps keep the exact check.
"""

import torch

from megatron_default_moe.check.compare import KINDS, Deviations

FACTOR = 2.0
# relative to the tensor's scale; fp32 on CUDA allows for TF32 GEMMs (Transformer Engine's)
TOLERANCE = {("cpu", torch.float32): 1e-5, ("cuda", torch.float32): 1e-4,
             ("cpu", torch.bfloat16): 3e-2, ("cuda", torch.bfloat16): 3e-2}  # fmt: skip
PAIRED = ("outputs", "expert grads", "router grads")  # the table's stock / default columns


def compared(default: Deviations, step, kind, layer_id, m) -> bool:
    """Whether Default's quantity is upstream of every routing flip of its run (module docstring)."""
    flips_LM = default.flips[step]
    if default.flips[:step].any():
        return False
    if default.same_flips[step] or not flips_LM.any():
        return True
    if kind in ("expert grads", "router grads"):
        return False
    return not flips_LM[: layer_id + 1, : (m + 1 if kind == "outputs" else None)].any()


def stock_value(stock: Deviations, step, kind, layer_id, m) -> float:
    if kind == "vectors":
        return max(float(stock.worst[step, KINDS.index("outputs"), layer_id].max()), 0.0)
    return max(float(stock.worst[step, KINDS.index(kind), layer_id, m]), 0.0)


def judge(default: Deviations, stock: Deviations | None, dtype, tolerance):
    """``(ok, messages, compared mask)``: the run's verdict (the same on every rank), this rank's
    failure messages (its bit-identity failures, and each broken bound whose worst error is this
    rank's), and which entries of ``default.worst`` were held to the baseline or tolerance."""
    ok, messages = not default.any_failed, list(default.failures)
    mask = torch.zeros(default.worst.shape, dtype=torch.bool)
    for index in (default.worst >= 0).nonzero().tolist():
        step, k, layer_id, m = index
        kind, err = KINDS[k], float(default.worst[tuple(index)])
        if not (dtype == torch.float32 or compared(default, step, kind, layer_id, m)):
            continue  # downstream of a routing flip (bf16)
        mask[tuple(index)], rules = True, []
        if stock is not None:
            base = stock_value(stock, step, kind, layer_id, m)
            rules.append((f"{FACTOR:g} x stock {base:.2e} + {tolerance:.0e}", FACTOR * base + tolerance))
        if dtype == torch.float32 or stock is None:
            rules.append((f"tolerance {tolerance:.0e}", tolerance))
        for rule, bound in rules:
            if not err <= bound:
                ok = False
                if default.local[tuple(index)] == err:
                    where = default.where[tuple(index)]
                    messages.append(f"step {step}: {where} off by {err:.3g} (relative; bound {rule})")
    return ok, messages, mask


def flips_text(default: Deviations, stock: Deviations | None) -> str:
    """``stock/default`` routing flips over the run (``-`` without a baseline), and the first step."""
    counts = [int(d.flips.sum()) if d is not None else None for d in (stock, default)]
    steps = [int(d.flips.sum((1, 2)).nonzero()[0]) for d in (default, stock) if d is not None and d.flips.any()]
    text = "/".join("-" if c is None else str(c) for c in counts)
    return text + (f"@{steps[0]}" if steps else "")


def _cell(value) -> str:
    return f"{'-':>8}" if value is None or value < 0 else f"{value:>8.1e}"


def table(rows) -> str:
    """``rows``: ``(layout, router, dispatcher, update, ok, default, stock or None, compared mask,
    seconds)`` -> text table: per run and quantity, the largest deviation over what was compared,
    of stock and of Default (vectors: Default only), and the routing flips."""
    head = f"{'layout':<16} {'router':<8} {'dispatcher':<10} {'update':<17} {'result':<6} " + " ".join(
        f"{kind:^17}" for kind in PAIRED) + f" {'vectors':>8} {'flips':>9} {'s':>6}"  # fmt: skip
    sub = " " * 62 + " ".join(f"{'stock':>8} {'default':>8}" for _ in PAIRED) + f" {'default':>8} {'stock/def':>9}"
    lines = [head, sub, "-" * len(head)]
    for layout, router, dispatcher, update, ok, default, stock, mask, seconds in rows:
        cells = []
        for kind in ("outputs", "expert grads", "router grads", "vectors"):
            k = KINDS.index(kind)
            picked = [tuple(i) for i in mask[:, k].nonzero().tolist()]
            worst = max((float(default.worst[s, k, layer, m]) for s, layer, m in picked), default=None)
            base = None if stock is None else max((stock_value(stock, s, kind, layer, m) for s, layer, m in picked),
                                                  default=None)  # fmt: skip
            cells += [_cell(base)] * (kind != "vectors") + [_cell(worst)]
        lines.append(f"{layout:<16} {router:<8} {dispatcher:<10} {update:<17} {'pass' if ok else 'FAIL':<6} "
                     f"{' '.join(cells)} {flips_text(default, stock):>9} {seconds:>6.1f}")  # fmt: skip
    return "\n".join(lines)
