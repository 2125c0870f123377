"""What the check asserts after every optimizer step, on every rank, against the one-rank run.

1. ``default_vectors`` bit-identical on every rank holding the layer (world all-gather): always
   exact, whatever the dtype (checkpoints save one replica; the ranks must agree to the bit);
2. equal to the one-rank run's (within the dtype's tolerance);
3. each rank's layer outputs equal the one-rank outputs of its tokens;
4. router gradients summed over the stage, and expert gradients summed over expert-data-parallel
   ranks, equal the one-rank gradients (of this rank's experts and shard).

With probes (``--probes``) each rank draws its own pairs, so the vectors (and the ``shared-1``
fit's tables, also checked in 1) follow draws no one-rank run makes. What probes must not change
is checked on the first step (the router gradient moves the router after it) for a backward-only
router: 3, and the expert gradients of the model's last layer (an earlier layer's output gradient
carries the next layer's default term through its router input). 2 is skipped, and for a
``forward``-mode router (whose output carries the term) 3-4 too.

In bf16, 2-4 are checked on the first step only: from the second step on, the one-rank run and
the layout hold parameters that differ by bf16 rounding of differently summed gradients, and a
near-tied routing decision that flips on that difference moves a token by a whole expert output
(seen on CPU at 2 ranks); check 1 stays exact every step.

Errors are relative to the tensor's scale: ``max|actual - expected| / (1 + max|expected|)``.
"""

import torch

from megatron_default_moe.check.model import NUM_LAYERS, master_name, my_shard, stage_layer_ids
from megatron_default_moe.check.train import my_tokens
from megatron_default_moe.checkpoint import BUFFER, FIT_BUFFERS

# relative to the tensor's scale; fp32 on CUDA allows for TF32 GEMMs (Transformer Engine's)
TOLERANCE = {("cpu", torch.float32): 1e-5, ("cuda", torch.float32): 1e-4,
             ("cpu", torch.bfloat16): 3e-2, ("cuda", torch.bfloat16): 3e-2}  # fmt: skip


def rel_error(actual, expected) -> float:
    """``max|a - e| / (1 + max|e|)`` in fp32 (inf on a shape mismatch or a NaN)."""
    if actual.shape != expected.shape:
        return float("inf")
    expected = expected.to(actual.device, torch.float32)
    err = (actual.float() - expected).abs().max() / (1.0 + expected.abs().max())
    return float(err) if torch.isfinite(err) else float("inf")


class StepErrors:
    """Failures and the largest relative error per kind over a run (this rank)."""

    KINDS = ("vectors", "outputs", "grads")

    def __init__(self, tolerance):
        self.tolerance, self.failures = tolerance, []
        self.max = dict.fromkeys(self.KINDS, 0.0)

    def record(self, kind, err, what):
        self.max[kind] = max(self.max[kind], err)
        if not err <= self.tolerance:
            self.failures.append(f"{what} off by {err:.3g} (relative; tolerance {self.tolerance:.0e})")


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


def check_step(stage, expected, outputs, grads, sequence_parallel, errors: StepErrors, tag: str, probes=False):
    """Checks 1-4 for one optimizer step of this rank (``expected``: the one-rank step; with
    ``probes``, what of them holds: see the module docstring)."""
    errors.failures += [f"{tag}: {msg}" for msg in identical_across_ranks(stage)]
    for j, (layer, layer_id) in enumerate(zip(stage.layers, stage_layer_ids())):
        if not probes:
            err = rel_error(layer.default_vectors, expected["defaults"][layer_id])
            errors.record("vectors", err, f"{tag} layer {layer_id}: default_vectors")
        unchanged = not probes or layer.mode != "forward"  # what probes leave as the one-rank run's
        for m, out in enumerate(outputs[j] if unchanged else ()):
            want = my_tokens(expected["outputs"][layer_id][m], sequence_parallel)
            errors.record("outputs", rel_error(out, want), f"{tag} layer {layer_id} micro-batch {m}: output")
        for pname, param in layer.named_parameters():
            if probes and (pname.startswith("router.") or not unchanged or layer_id != NUM_LAYERS - 1):
                continue
            mname = master_name(layer, pname)
            want = my_shard(param, expected["grads"][layer_id][mname])
            errors.record("grads", rel_error(grads[j][mname], want), f"{tag} layer {layer_id}: grad of {mname}")


def summarise(errors: StepErrors, device) -> tuple[bool, dict]:
    """The verdict and largest errors over all ranks (each rank checks only its own share)."""
    values = torch.tensor([float(len(errors.failures))] + [errors.max[k] for k in errors.KINDS], device=device)
    torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
    values = values.tolist()
    return values[0] == 0, dict(zip(errors.KINDS, values[1:]))


def table(rows) -> str:
    """``rows``: ``(layout, router, dispatcher, update, ok, max errors, seconds)`` -> text table."""
    head = f"{'layout':<16} {'router':<8} {'dispatcher':<10} {'update':<17} {'result':<6} " \
           f"{'vectors':>9} {'outputs':>9} {'grads':>9} {'s':>6}"  # fmt: skip
    lines = [head, "-" * len(head)]
    for layout, router, dispatcher, update, ok, errs, seconds in rows:
        lines.append(
            f"{layout:<16} {router:<8} {dispatcher:<10} {update:<17} {'pass' if ok else 'FAIL':<6} "
            f"{errs['vectors']:>9.2e} {errs['outputs']:>9.2e} {errs['grads']:>9.2e} {seconds:>6.1f}"
        )
    return "\n".join(lines)
