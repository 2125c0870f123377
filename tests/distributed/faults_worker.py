"""A rank whose expert emits NaN/Inf under real process groups (``torchrun`` + gloo, CPU, 2 ranks).

``torchrun --nproc-per-node 2 faults_worker.py`` loops, in one launch, over the layouts ``dp2``
(EP=1: every rank holds every expert, only rank 1's expert 1 is poisoned) and ``ep2`` (expert 1
lives on rank 0 only; rank 1's tokens routed there come back poisoned), the poisons ``nan``
(expert 1's ``linear_fc2`` weight NaN) and ``inf`` (a forward hook adds +Inf to its output rows),
both update modes, and two estimators: the routed rows' EMA (paper router) and the probes with
the ``shared-1`` fit (renormalised router, ``probes=8``). Per case, after ``MICRO_BATCHES``
forward/backward passes and one ``update_default_vectors``, on every rank:

1. expert 1's vector (and with the fit its ``default_fit`` row) kept its value bit for bit, every
   other expert's moved, and all tables are finite and bit-identical across ranks (all_gather);
2. ``nonfinite_skips`` is ``[0, n, 0, 0]`` on every rank (``n``: micro-batches in ``microbatch``
   mode, 1 in ``step`` mode); ``experts_updated`` is ``[T, F, T, T]``;
3. rank 0 (first rank of the stage) logs one WARNING naming layer 3 and expert 1, rank 1 none.

Prints ``ok CASE`` per pass (rank 0) and ``PASSED: N cases`` at the end.
"""

import logging
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LAYOUTS = {"dp2": {}, "ep2": dict(expert_model_parallel_size=2)}
FAMILIES = {  # (TransformerConfig overrides, DefaultMoEConfig overrides)
    "routed-rows": ({}, {}),
    "probes": (dict(moe_router_pre_softmax=False), dict(probes=8)),
}
LAYER_NUMBER, POISONED, MICRO_BATCHES = 3, 1, 2
UPDATE_LOGGER = "megatron_default_moe.update"


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def gathered(tensor):
    tensors = [torch.zeros_like(tensor) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(tensors, tensor.contiguous())
    return tensors


def poisoned_layer(layout, family, update, poison):
    from helpers import moe_config, moe_submodules

    from megatron_default_moe import DefaultMoEConfig, DefaultMoELayer

    router, dm = FAMILIES[family]
    config = moe_config(**router, expert_model_parallel_size=LAYOUTS[layout].get("expert_model_parallel_size", 1))
    torch.manual_seed(0)
    layer = DefaultMoELayer(config, moe_submodules(4), dm_config=DefaultMoEConfig(update=update, **dm))
    layer.set_layer_number(LAYER_NUMBER)
    with torch.no_grad():
        layer.default_vectors.copy_(torch.randn(4, 16, generator=torch.Generator().manual_seed(0)))
    rank = torch.distributed.get_rank()
    owner = POISONED in layer.local_expert_indices and (layout != "dp2" or rank == 1)
    if owner:
        expert = layer.experts.local_experts[layer.local_expert_indices.index(POISONED)]
        if poison == "nan":
            with torch.no_grad():
                expert.linear_fc2.weight.fill_(float("nan"))
        else:
            expert.register_forward_hook(lambda module, args, out: (out[0] + float("inf"), *out[1:]))
    return layer, owner


def check(layout, family, update, poison):
    from megatron_default_moe import update_default_vectors

    layer, owner = poisoned_layer(layout, family, update, poison)
    rank, failures = torch.distributed.get_rank(), []
    tables = layer._fp32_tables()
    before = {name: getattr(layer, name).clone() for name in tables}
    records = Records()
    logging.getLogger(UPDATE_LOGGER).addHandler(records)
    try:
        seen = torch.zeros(2)  # [any Inf, any NaN] in this rank's outputs
        for mb in range(MICRO_BATCHES):
            gen = torch.Generator().manual_seed(100 * rank + mb)
            x = torch.randn(8, 2, 16, generator=gen, requires_grad=True)
            out, _ = layer(x)
            out.nansum().backward()
            seen = torch.maximum(seen, torch.tensor([float(torch.isinf(out).any()), float(torch.isnan(out).any())]))
        update_default_vectors(layer)
    finally:
        logging.getLogger(UPDATE_LOGGER).removeHandler(records)

    torch.distributed.all_reduce(seen)
    if poison == "nan" and not seen[1]:
        failures.append("the poisoned expert never emitted NaN")
    if poison == "inf" and (not seen[0] or seen[1]):
        failures.append(f"the poisoned expert did not emit pure Inf (Inf, NaN seen: {seen.tolist()})")
    if family == "probes" and (layer.probes is None or "default_fit" not in tables):
        failures.append("no probes / shared-1 fit on the renormalised router")
    for name in tables:
        table = getattr(layer, name)
        if not torch.isfinite(table).all():
            failures.append(f"{name} is not finite")
        if any(not torch.equal(t, table) for t in gathered(table)):
            failures.append(f"{name} differs across ranks")
    for name in ("default_vectors", "default_fit"):
        if name in tables:
            moved = [not torch.equal(getattr(layer, name)[e], before[name][e]) for e in range(4)]
            if moved != [True, False, True, True]:
                failures.append(f"{name} rows moved {moved}, want only expert {POISONED} kept")
    want = [0, MICRO_BATCHES if update == "microbatch" else 1, 0, 0]
    skips = layer.nonfinite_skips
    if skips.tolist() != want or any(not torch.equal(s, skips) for s in gathered(skips)):
        failures.append(f"nonfinite_skips {skips.tolist()} on rank {rank}, want {want} on every rank")
    if layer.experts_updated.tolist() != [True, False, True, True]:
        failures.append(f"experts_updated {layer.experts_updated.tolist()}")
    logged = [m for m in records.messages if f"layer {LAYER_NUMBER}" in m and f"expert(s) [{POISONED}]" in m]
    if len(records.messages) != (1 if rank == 0 else 0) or len(logged) != len(records.messages):
        failures.append(f"rank {rank} logged {records.messages}")
    return [f"rank {rank} (poisons: {owner}): {f}" for f in failures]


def main():
    from helpers import finish_worker, report_case

    from megatron_default_moe.testing import cpu

    cases, failed = 0, False
    for layout in LAYOUTS:
        cpu.init_parallel(seed=1234, **LAYOUTS[layout])
        for family in FAMILIES:
            for update in ("microbatch", "step"):
                for poison in ("nan", "inf"):
                    failures = check(layout, family, update, poison)
                    failed |= report_case(f"{layout}/{family}/{update}/{poison}", failures)
                    cases += 1
        cpu.destroy_parallel()
    finish_worker(failed, f"{cases} cases")


if __name__ == "__main__":
    main()
