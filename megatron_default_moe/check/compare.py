"""What the check measures after every optimizer step, on every rank, against the one-rank run.

1. ``default_vectors`` bit-identical on every rank holding the layer (world all-gather): always
   exact, whatever the dtype (checkpoints save one replica; the ranks must agree to the bit);
2. their deviation from the one-rank run's (``vectors``);
3. each rank's layer outputs against the one-rank outputs of its tokens (``outputs``);
4. router gradients summed over the stage (``router grads``), and expert gradients summed over
   expert-data-parallel ranks (``expert grads``, this rank's experts and shard), against the
   one-rank gradients.

5. routing flips: tokens whose routing map (Megatron's, before any probe pairs) differs from the
   one-rank run's, per step, layer and micro-batch.

2-5 are measured, not judged, here: ``Deviations`` keeps the largest relative error per step,
kind, layer and micro-batch (and where it was) and the flips, and ``verdict`` decides. The stock
baseline (Megatron's ``MoELayer`` against its own one-rank run) is measured the same way, 1-2 aside.

Probes (the default of renormalised and sigmoid routers) draw by global token position
(``ops/strata.py``), so every layout draws the one-rank run's pairs and all of 1-5 hold at every
step, as for the routed-row EMA.

Errors are relative to the tensor's scale: ``max|actual - expected| / (1 + max|expected|)``.
"""

import torch

from megatron_default_moe.check.model import MICRO_BATCHES, NUM_LAYERS, STEPS, S, master_name, my_shard, stage_layer_ids
from megatron_default_moe.check.train import my_tokens
from megatron_default_moe.checkpoint import BUFFER, FIT_BUFFERS

KINDS = ("vectors", "outputs", "expert grads", "router grads")


def rel_error(actual, expected) -> float:
    """``max|a - e| / (1 + max|e|)`` in fp32 (inf on a shape mismatch or a NaN)."""
    if actual.shape != expected.shape:
        return float("inf")
    expected = expected.to(actual.device, torch.float32)
    err = (actual.float() - expected).abs().max() / (1.0 + expected.abs().max())
    return float(err) if torch.isfinite(err) else float("inf")


class Deviations:
    """One run's measurements (this rank's, then every rank's after ``reduce``).

    ``local``/``worst`` ``[step, kind, layer, micro-batch]``: the largest relative error (-1 where
    nothing was measured; gradients and vectors in micro-batch slot 0), with where this rank's was
    (``where``). ``flips`` ``[step, layer, micro-batch]``: tokens whose routing (Megatron's map)
    differs from the one-rank run's, summed over ranks; ``masks`` this rank's flipped tokens. Also
    the failures of the exact check 1, and after ``reduce`` against a stock run ``same_flips[step]``:
    whether that step's flips are stock's, token for token.
    """

    def __init__(self):
        self.local = torch.full((STEPS, len(KINDS), NUM_LAYERS, MICRO_BATCHES), -1.0, dtype=torch.float64)
        self.local_flips = torch.zeros(STEPS, NUM_LAYERS, MICRO_BATCHES, dtype=torch.float64)
        self.where, self.masks, self.failures = {}, {}, []

    def record(self, step, kind, layer_id, m, err, what):
        index = (step, KINDS.index(kind), layer_id, m)
        if not err <= self.local[index]:  # a larger error, or a NaN
            self.local[index], self.where[index] = err, what

    def record_route(self, step, layer_id, m, mine_TE, expected_TE):
        flipped_T = (mine_TE != expected_TE.to(mine_TE.device)).any(-1).cpu()
        self.masks[step, layer_id, m] = flipped_T
        self.local_flips[step, layer_id, m] += int(flipped_T.sum())

    def reduce(self, device, stock=None):
        """Every rank's largest errors, flips and failures (each rank measures only its own share)."""
        differs = torch.zeros(STEPS, dtype=torch.float64)
        for (step, layer_id, m), mask in self.masks.items():
            theirs = stock.masks.get((step, layer_id, m)) if stock is not None else None
            differs[step] = max(float(differs[step]), float(theirs is None or not torch.equal(mask, theirs)))
        head = torch.tensor([float(len(self.failures))], dtype=torch.float64)
        values = torch.cat([head, differs, self.local.flatten()]).to(device)
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
        flips = self.local_flips.to(device)
        torch.distributed.all_reduce(flips)
        values = values.cpu()
        self.any_failed, self.same_flips = bool(values[0] > 0), (values[1 : 1 + STEPS] == 0).tolist()
        self.worst, self.flips = values[1 + STEPS :].view(self.local.shape), flips.cpu()


def default_tables(layer) -> torch.Tensor:
    """The layer's default vectors and, with the ``shared-1`` fit, its tables, flat (fp32)."""
    names = (BUFFER, *(FIT_BUFFERS if layer.fit is not None else ()))
    return torch.cat([getattr(layer, name).flatten() for name in names])


def identical_across_ranks(stage) -> list[str]:
    """Check 1: this rank's vectors (and fit tables) against every rank of the same pipeline stage,
    bit for bit."""
    from megatron.core import parallel_state as ps

    mine_LEH = torch.stack([default_tables(layer) for layer in stage.layers])
    everyone = [torch.empty_like(mine_LEH) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(everyone, mine_LEH)
    my_stage = torch.tensor([ps.get_pipeline_model_parallel_rank()], device=mine_LEH.device)
    stages = [torch.empty_like(my_stage) for _ in everyone]
    torch.distributed.all_gather(stages, my_stage)
    return [
        f"default vectors or fit tables differ from rank {other}'s (not bit-identical)"
        for other, (theirs_LEH, their_stage) in enumerate(zip(everyone, stages))
        if int(their_stage) == int(my_stage) and not torch.equal(theirs_LEH, mine_LEH)
    ]


def my_routes(route_TE, sequence_parallel):
    """This rank's rows of a one-rank routing map (tokens in ``[S, B]`` order, as Megatron's)."""
    experts = route_TE.shape[-1]
    return my_tokens(route_TE.view(S, -1, experts), sequence_parallel).view(-1, experts)


def measure_step(stage, expected, step_data, sequence_parallel, devs: Deviations, step):
    """2-4 and the routing flips for one optimizer step of this rank (``expected``: the one-rank
    step; ``step_data``: ``train``'s ``(outputs, grads, routes)``). A stock stage has no vectors."""
    outputs, grads, routes = step_data
    for j, (layer, layer_id) in enumerate(zip(stage.layers, stage_layer_ids())):
        where = f"layer {layer_id}"
        for m, route in enumerate(routes[j]):
            devs.record_route(step, layer_id, m, route, my_routes(expected["routes"][layer_id][m], sequence_parallel))
        if hasattr(layer, BUFFER):
            err = rel_error(layer.default_vectors, expected["defaults"][layer_id])
            devs.record(step, "vectors", layer_id, 0, err, f"{where} default_vectors")
        for m, out in enumerate(outputs[j]):
            want = my_tokens(expected["outputs"][layer_id][m], sequence_parallel)
            devs.record(step, "outputs", layer_id, m, rel_error(out, want), f"{where} micro-batch {m} output")
        for pname, param in layer.named_parameters():
            mname = master_name(layer, pname)
            want = my_shard(param, expected["grads"][layer_id][mname])
            kind = "router grads" if pname.startswith("router.") else "expert grads"
            devs.record(step, kind, layer_id, 0, rel_error(grads[j][mname], want), f"{where} grad of {mname}")
