"""Default MoE under every parallel layout, against a one-rank run (torchrun + gloo on CPU).

Two kinds of launch share one training loop (``train``):

* ``python worker.py --save-reference REF``: one process, every parallel size 1. Builds a stack of
  ``NUM_LAYERS`` Default MoE layers from Megatron's local spec and trains it for ``STEPS`` optimizer
  steps of ``MICRO_BATCHES`` micro-batches (Megatron's own schedule, SGD), in both update modes.
  Saves the initial weights and, per step and layer: the default vectors, the layer outputs and the
  gradients.
* ``torchrun --nproc-per-node N worker.py --reference REF --layouts NAME[:ROUTER]...``: loops over
  parallel layouts in one launch (``ROUTER``: a family of ``ROUTERS``, the paper's by default). For each layout, dispatcher (``allgather``, ``alltoall``) and update mode,
  it loads the reference weights (sliced to this rank's experts and expert-TP shard), feeds each
  rank its Megatron share of the same global batch, trains the same way and checks after every
  step that

  - ``default_vectors`` are bit-identical on every rank holding the layer (world all-gather);
  - they equal the one-rank run's (fp32 tolerance);
  - each rank's layer outputs equal the one-rank outputs of its tokens;
  - router gradients summed over the stage, and expert gradients summed over expert-data-parallel
    ranks, equal the one-rank gradients (of this rank's experts and shard).

Async all-reduces land only at ``wait()`` here (see ``defer_async_all_reduce``), as they do with NCCL,
so a missing wait fails the checks instead of passing by luck of gloo's timing. Token shares: the
global micro-batch ``[S, B, H]`` is cut by data-parallel rank along ``B``, then by context-parallel
rank and (sequence parallel) tensor-parallel rank along ``S``. Expert-parallel ranks are carved out
of these, so they hold distinct tokens too. (Megatron's CP splits the sequence into 2·CP
load-balanced chunks; the MoE layer is token-wise, so a contiguous split tests the same thing.)
"""

import argparse
import os
import sys
import time

import torch

from megatron_default_moe.testing import cpu

S, B, H, E, TOPK, FFN = 8, 4, 16, 4, 2, 24  # global micro-batch [S, B, H]; experts; expert FFN
NUM_LAYERS, STEPS, MICRO_BATCHES, LR, BETA = 2, 3, 2, 2e-3, 0.7
ATOL = RTOL = 1e-5
DISPATCHERS = ("allgather", "alltoall")
UPDATES = ("microbatch", "step")

# name -> initialize_model_parallel sizes (tp = tensor, sp = sequence parallel, ep = expert,
# etp = expert tensor, cp = context, pp = pipeline); data parallel fills the rest of the world.
LAYOUTS = {
    "ep2": dict(ep=2),
    "ep4": dict(ep=4),
    "dp2xep2": dict(ep=2),  # on 4 ranks: expert-data-parallel 2
    "tp2sp": dict(tp=2, sp=True),  # expert TP defaults to TP
    "tp2sp-ep2": dict(tp=2, sp=True, ep=2, etp=1),
    "tp2sp-ep2-etp2": dict(tp=2, sp=True, ep=2, etp=2),
    "etp2": dict(etp=2),
    "etp2-ep2": dict(etp=2, ep=2),
    "cp2": dict(cp=2),
    "cp2-ep2": dict(cp=2, ep=2),
    "pp2": dict(pp=2),
    "pp2-ep2": dict(pp=2, ep=2),
    "pp2-tp2sp": dict(pp=2, tp=2, sp=True),
}
# router family -> TransformerConfig overrides; a layout runs with one as ``LAYOUT:ROUTER``
ROUTERS = {
    "paper": {},  # softmax with pre-softmax: the default term enters the forward
    "renorm": dict(moe_router_pre_softmax=False),  # Mixtral / Qwen3: backward-only
    "sigmoid": dict(  # DeepSeek-V3: expert bias, groups, scaling factor; backward-only
        moe_router_pre_softmax=False,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_num_groups=2,
        moe_router_group_topk=1,
        moe_router_topk_scaling_factor=2.5,
    ),
}
EXPERT_BIAS = torch.tensor([0.3, -0.2, 0.1, -0.4])  # set once, so the bias moves the selection


def parse_layout(spec):
    """``"ep2"`` or ``"ep2:sigmoid"`` -> (layout name, router family)."""
    name, _, router = spec.partition(":")
    return name, router or "paper"


def log(*args):
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(*args, flush=True)


# -- async semantics ------------------------------------------------------------------------------
class _DeferredWork:
    """An async all-reduce whose result is written into the caller's tensor only at ``wait()``."""

    def __init__(self, work, result, target):
        self.work, self.result, self.target = work, result, target

    def wait(self, *args, **kwargs):
        self.work.wait()
        self.target.copy_(self.result)
        return True

    def is_completed(self):
        return self.work.is_completed()


def defer_async_all_reduce():
    """Make ``all_reduce(async_op=True)`` deliver at ``wait()`` only (NCCL-like), not when gloo finishes."""
    inner = torch.distributed.all_reduce

    def all_reduce(tensor, op=torch.distributed.ReduceOp.SUM, group=None, async_op=False):
        if not async_op:
            return inner(tensor, op=op, group=group, async_op=False)
        result = tensor.clone()
        return _DeferredWork(inner(result, op=op, group=group, async_op=True), result, tensor)

    torch.distributed.all_reduce = all_reduce


# -- model ----------------------------------------------------------------------------------------
def make_config(dispatcher, sizes, router="paper"):
    from helpers import moe_config

    return moe_config(
        **ROUTERS[router],
        num_layers=NUM_LAYERS,
        hidden_size=H,
        num_moe_experts=E,
        moe_router_topk=TOPK,
        moe_ffn_hidden_size=FFN,
        ffn_hidden_size=FFN,
        moe_token_dispatcher_type=dispatcher,
        pipeline_dtype=torch.float32,
        init_method_std=0.4,  # outputs of order 1, so the tolerances below mean something
        calculate_per_token_loss=True,  # the loss below is a plain sum: no schedule rescaling
        tensor_model_parallel_size=sizes.get("tp", 1),
        sequence_parallel=sizes.get("sp", False),
        expert_model_parallel_size=sizes.get("ep", 1),
        expert_tensor_parallel_size=sizes.get("etp", sizes.get("tp", 1)),
        context_parallel_size=sizes.get("cp", 1),
        pipeline_model_parallel_size=sizes.get("pp", 1),
    )


class Stage(torch.nn.Module):
    """This pipeline stage's MoE layers, applied in turn (the input comes from the previous stage)."""

    def __init__(self, config, layers):
        from megatron.core.enums import ModelType

        super().__init__()
        self.config, self.model_type = config, ModelType.encoder_or_decoder
        self.layers = torch.nn.ModuleList(layers)
        self.input_tensor = None

    def set_input_tensor(self, tensors):
        self.input_tensor = tensors[0] if isinstance(tensors, (list, tuple)) else tensors

    def forward(self, x_SBH):
        h_SBH = x_SBH if self.input_tensor is None else self.input_tensor
        for layer in self.layers:
            h_SBH, _ = layer(h_SBH)
        return h_SBH


def stage_layer_ids():
    from megatron.core import parallel_state as ps

    per_stage = NUM_LAYERS // ps.get_pipeline_model_parallel_world_size()
    first = ps.get_pipeline_model_parallel_rank() * per_stage
    return list(range(first, first + per_stage))


def master_name(layer, name):
    """Name of a local parameter in the one-rank layer (local expert index -> global index)."""
    prefix = "experts.local_experts."
    if not name.startswith(prefix):
        return name
    local, rest = name[len(prefix) :].split(".", 1)
    return f"{prefix}{layer.local_expert_indices[int(local)]}.{rest}"


def my_shard(layer, name, param, master_tensor):
    """This rank's piece of a one-rank tensor: its expert-TP shard along the partition dim."""
    from megatron.core import parallel_state as ps

    etp = ps.get_expert_tensor_parallel_world_size()
    if not getattr(param, "tensor_model_parallel", False) or etp == 1:
        return master_tensor
    chunks = torch.chunk(master_tensor, etp, dim=param.partition_dim)
    return chunks[ps.get_expert_tensor_parallel_rank()]


def build_stage(dispatcher, update, sizes, weights=None, router="paper"):
    """This stage's Default MoE layers; with ``weights`` (one-rank state dicts), copied from them."""
    from megatron_default_moe import (
        DefaultMoEConfig,
        DefaultMoELayer,
        wrap_finalize_model_grads,
    )

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from helpers import moe_submodules

    config = make_config(dispatcher, sizes, router)
    layers = []
    for layer_id in stage_layer_ids():
        torch.manual_seed(100 + layer_id)
        layer = DefaultMoELayer(
            config,
            moe_submodules(E),
            layer_number=layer_id + 1,
            dm_config=DefaultMoEConfig(beta=BETA, update=update),
        )
        if weights is not None:
            with torch.no_grad():
                for name, param in layer.named_parameters():
                    param.copy_(my_shard(layer, name, param, weights[layer_id][master_name(layer, name)]))
        if layer.router.expert_bias is not None:
            layer.router.expert_bias.copy_(EXPERT_BIAS)
        layers.append(layer)
    if update == "step":
        config.finalize_model_grads_func = lambda *args, **kwargs: None
        wrap_finalize_model_grads(config)  # update_default_vectors after the last backward
    return Stage(config, layers)


# -- data -----------------------------------------------------------------------------------------
def global_micro_batch(step, micro_batch):
    """Input ``x`` and upstream gradient ``g`` (loss = Σ y·g) of one global micro-batch."""
    gen = torch.Generator().manual_seed(1000 * step + micro_batch)
    return torch.randn(S, B, H, generator=gen), torch.randn(S, B, H, generator=gen)


def my_tokens(t_SBH, sequence_parallel):
    """This rank's share of a global ``[S, B, H]`` tensor (see the module docstring)."""
    from megatron.core import parallel_state as ps

    dp, cp = ps.get_data_parallel_world_size(), ps.get_context_parallel_world_size()
    tp = ps.get_tensor_model_parallel_world_size() if sequence_parallel else 1
    b, s = B // dp, S // (cp * tp)
    seq_index = ps.get_context_parallel_rank() * tp + (ps.get_tensor_model_parallel_rank() if tp > 1 else 0)
    batch_index = ps.get_data_parallel_rank()
    return t_SBH[seq_index * s : (seq_index + 1) * s, batch_index * b : (batch_index + 1) * b].contiguous()


# -- training -------------------------------------------------------------------------------------
def reduced_grads(stage):
    """Per layer, ``{one-rank name: grad}`` summed over the ranks that share the parameter.

    Router weights are replicated on the whole stage; each shard of an expert on its
    expert-data-parallel ranks. This is what Megatron's DDP would reduce.
    """
    from megatron.core import parallel_state as ps

    out = []
    for layer in stage.layers:
        grads = {}
        for name, param in layer.named_parameters():
            grad = param.grad.clone()
            if name.startswith("experts."):
                group = ps.get_expert_data_parallel_group()
            else:
                group = ps.get_tensor_and_data_parallel_group(with_context_parallel=True)
            torch.distributed.all_reduce(grad, group=group)
            grads[master_name(layer, name)] = grad
        out.append(grads)
    return out


def train(stage, sequence_parallel, on_step):
    """``STEPS`` SGD steps of ``MICRO_BATCHES`` micro-batches with Megatron's schedule.

    Calls ``on_step(step, outputs, grads)`` before each optimizer update: ``outputs[j][m]`` is local
    layer ``j``'s output for micro-batch ``m``; ``grads`` from ``reduced_grads``.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    outputs = [[] for _ in stage.layers]
    for j, layer in enumerate(stage.layers):
        layer.register_forward_hook(lambda m, i, out, j=j: outputs[j].append(out[0].detach().clone()))

    def forward_step(data_iterator, model):
        x, g = next(data_iterator)
        y = model(x)
        return y, lambda y: ((y.float() * g).sum(), torch.tensor(y.numel() // H, dtype=torch.int), {})

    for step in range(STEPS):
        for out in outputs:
            out.clear()
        batches = [global_micro_batch(step, m) for m in range(MICRO_BATCHES)]
        data = iter([(my_tokens(x, sequence_parallel), my_tokens(g, sequence_parallel)) for x, g in batches])
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=data,
            model=[stage],
            num_microbatches=MICRO_BATCHES,
            seq_length=S,  # Megatron divides by CP (and TP with SP) for the pipeline messages
            micro_batch_size=my_tokens(batches[0][0], sequence_parallel).shape[1],
        )
        grads = reduced_grads(stage)
        on_step(step, outputs, grads)
        with torch.no_grad():
            for layer, layer_grads in zip(stage.layers, grads):
                for name, param in layer.named_parameters():
                    param -= LR * layer_grads[master_name(layer, name)]
                    param.grad = None


# -- one-rank reference ---------------------------------------------------------------------------
def save_reference(path):
    cpu.init_parallel(seed=0)
    stage = build_stage("alltoall", "microbatch", {})
    weights = [{n: p.detach().clone() for n, p in layer.named_parameters()} for layer in stage.layers]
    ref = {"weights": weights, "runs": {}}
    for router, update in [(r, u) for r in ROUTERS for u in UPDATES]:
        stage, steps = build_stage("alltoall", update, {}, weights, router), []

        def record(step, outputs, grads):
            defaults = [layer.default_vectors.clone() for layer in stage.layers]
            outputs = [[o.clone() for o in layer_outputs] for layer_outputs in outputs]
            steps.append({"defaults": defaults, "outputs": outputs, "grads": grads})

        train(stage, False, record)
        ref["runs"][router, update] = steps
    torch.save(ref, path)
    cpu.destroy_parallel()
    print(f"saved one-rank reference to {path}")


# -- checks ---------------------------------------------------------------------------------------
def close(actual, expected):
    """Equal up to fp32 rounding, relative to the tensor's scale (the sigmoid family's gradients
    reach ~100, where a different summation order over ranks moves single elements by ~1e-6 of it)."""
    if actual.shape != expected.shape:
        return False
    return bool((actual - expected).abs().max() <= ATOL + RTOL * expected.abs().max())


def check_step(stage, expected, outputs, grads, sequence_parallel):
    """Failure messages for one optimizer step of this rank (``expected``: the one-rank step)."""
    from megatron.core import parallel_state as ps

    failures = []
    # 1. bit-identical on every rank that holds the same layers (world all-gather, same stage)
    mine_LEH = torch.stack([layer.default_vectors for layer in stage.layers])
    everyone = [torch.empty_like(mine_LEH) for _ in range(torch.distributed.get_world_size())]
    stages = [torch.empty(1, dtype=torch.long) for _ in everyone]
    torch.distributed.all_gather(everyone, mine_LEH)
    my_stage = ps.get_pipeline_model_parallel_rank()
    torch.distributed.all_gather(stages, torch.tensor([my_stage]))
    for other, (theirs_LEH, their_stage) in enumerate(zip(everyone, stages)):
        if int(their_stage) == my_stage and not torch.equal(theirs_LEH, mine_LEH):
            failures.append(f"default_vectors differ from rank {other}'s")
    for j, (layer, layer_id) in enumerate(zip(stage.layers, stage_layer_ids())):
        # 2. equal to the one-rank run over the whole global batch
        want_EH = expected["defaults"][layer_id]
        if not close(layer.default_vectors, want_EH):
            err = (layer.default_vectors - want_EH).abs().max()
            failures.append(f"layer {layer_id}: default_vectors off by {err:.3g}")
        # 3. outputs on this rank's tokens
        for m, out in enumerate(outputs[j]):
            if not close(out, my_tokens(expected["outputs"][layer_id][m], sequence_parallel)):
                failures.append(f"layer {layer_id} micro-batch {m}: output differs")
        # 4. gradients, summed over the ranks that share each parameter
        for pname, param in layer.named_parameters():
            mname = master_name(layer, pname)
            want = my_shard(layer, pname, param, expected["grads"][layer_id][mname])
            if not close(grads[j][mname], want):
                err = (grads[j][mname] - want).abs().max()
                failures.append(f"layer {layer_id}: grad of {mname} off by {err:.3g} (max |grad| {want.abs().max():.3g})")
    return failures


def check_layout(spec, ref):
    """Every dispatcher and update mode of one layout (and router); this rank's failure messages."""
    name, router = parse_layout(spec)
    sizes = LAYOUTS[name]
    cpu.init_parallel(
        seed=0,
        tensor_model_parallel_size=sizes.get("tp", 1),
        expert_model_parallel_size=sizes.get("ep", 1),
        expert_tensor_parallel_size=sizes.get("etp", sizes.get("tp", 1)),
        context_parallel_size=sizes.get("cp", 1),
        pipeline_model_parallel_size=sizes.get("pp", 1),
    )
    sp, failures = sizes.get("sp", False), []
    try:
        for dispatcher in DISPATCHERS:
            for update in UPDATES:
                tag, start = f"{spec}/{dispatcher}/{update}", time.time()
                stage = build_stage(dispatcher, update, sizes, ref["weights"], router)
                mine = []

                def on_step(step, outputs, grads):
                    for msg in check_step(stage, ref["runs"][router, update][step], outputs, grads, sp):
                        mine.append(f"rank {torch.distributed.get_rank()} {tag} step {step}: {msg}")

                train(stage, sp, on_step)
                failures += mine
                # the verdict of all ranks (each rank checks only its own share)
                bad = torch.tensor([len(mine)])
                torch.distributed.all_reduce(bad)
                log(f"{'FAIL' if bad.item() else 'ok  '} {tag} ({time.time() - start:.1f}s)")
    finally:
        cpu.destroy_parallel()
    return failures


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--save-reference", metavar="REF", help="run the one-rank reference, save to REF")
    parser.add_argument("--reference", metavar="REF", help="one-rank reference to check against")
    layouts = sorted(LAYOUTS) + [f"{name}:{router}" for name in sorted(LAYOUTS) for router in ROUTERS]
    parser.add_argument("--layouts", nargs="+", default=[], choices=layouts, metavar="LAYOUT[:ROUTER]")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.save_reference:
        save_reference(args.save_reference)
        return
    defer_async_all_reduce()
    ref = torch.load(args.reference, weights_only=False)
    failures = [msg for name in args.layouts for msg in check_layout(name, ref)]
    for msg in failures[:8]:
        print("FAILED", msg, flush=True)
    bad = torch.tensor([len(failures)])
    torch.distributed.all_reduce(bad)
    world = torch.distributed.get_world_size()
    log(f"{'FAILED' if bad.item() else 'PASSED'}: {len(args.layouts)} layouts on {world} ranks")
    torch.distributed.destroy_process_group()
    sys.exit(1 if bad.item() else 0)


if __name__ == "__main__":
    main()
