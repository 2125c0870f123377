"""The check's training loop (Megatron's own schedule, SGD on fp32 master weights) and its data.

Token shares, Megatron's cut (``ops/strata.py``): the global micro-batch ``[S, B, H]`` is cut by
data-parallel rank along ``B``; context parallelism splits ``S`` into 2·CP chunks, rank ``r``
holding chunks ``r`` and ``2·CP-1-r`` (load balancing, as ``pretrain_gpt.py``); sequence
parallelism cuts that local sequence by tensor-parallel rank. Expert-parallel ranks are carved out
of these, so they hold distinct tokens too. The probes' draw is keyed by global token position
over the same cut, so every layout draws the one-rank run's pairs.
"""

import torch

from megatron_default_moe.check.model import (
    DISPATCHERS_REFERENCE,
    H,
    LR,
    MICRO_BATCHES,
    S,
    STEPS,
    Setup,
    build_stage,
    has_probes_by_default,
    master_name,
)


def global_micro_batch(setup: Setup, step, micro_batch):
    """Input ``x`` (``setup.dtype``) and upstream gradient ``g`` (fp32; loss = Σ y·g) of one global
    micro-batch, drawn on the CPU so every rank and the reference see the same numbers."""
    gen = torch.Generator().manual_seed(1000 * step + micro_batch)
    x = torch.randn(S, setup.batch, H, generator=gen)
    g = torch.randn(S, setup.batch, H, generator=gen)
    return x.to(setup.device, setup.dtype), g.to(setup.device)


def my_tokens(t_SBH, sequence_parallel):
    """This rank's share of a global ``[S, B, ...]`` tensor (see the module docstring)."""
    from megatron.core import parallel_state as ps

    from megatron_default_moe.ops.strata import TokenLayout

    dp, cp = ps.get_data_parallel_world_size(), ps.get_context_parallel_world_size()
    tp = ps.get_tensor_model_parallel_world_size() if sequence_parallel else 1
    layout = TokenLayout(ps.get_data_parallel_rank(), ps.get_context_parallel_rank(), cp,
                         ps.get_tensor_model_parallel_rank() if tp > 1 else 0, tp)  # fmt: skip
    b, seq = t_SBH.shape[1] // dp, S // (cp * tp)
    rows = [t_SBH[glob : glob + n, layout.dp_rank * b : (layout.dp_rank + 1) * b] for _, glob, n in layout.segments(seq)]
    return torch.cat(rows).contiguous()


def reduced_grads(stage):
    """Per layer, ``{one-rank name: fp32 grad}`` summed over the ranks that share the parameter.

    Router weights are replicated on the whole stage; each shard of an expert on its
    expert-data-parallel ranks. This is what Megatron's DDP would reduce.
    """
    from megatron.core import parallel_state as ps

    out = []
    for layer in stage.layers:
        grads = {}
        for name, param in layer.named_parameters():
            grad = param.grad.float().clone()
            if name.startswith("experts."):
                group = ps.get_expert_data_parallel_group()
            else:
                group = ps.get_tensor_and_data_parallel_group(with_context_parallel=True)
            torch.distributed.all_reduce(grad, group=group)
            grads[master_name(layer, name)] = grad
        out.append(grads)
    return out


def train(setup: Setup, stage, sequence_parallel, on_step):
    """``STEPS`` SGD steps of ``MICRO_BATCHES`` micro-batches with Megatron's schedule.

    Calls ``on_step(step, outputs, grads, routes)`` before each optimizer update: ``outputs[j][m]``
    is local layer ``j``'s output for micro-batch ``m``, ``routes[j][m]`` its router's routing map
    (Megatron's ``[T, E]``, before any probe pairs); ``grads`` from ``reduced_grads``. The update is
    applied to fp32 master copies (as Megatron's optimizer does), then cast to the parameters.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    outputs, routes = [[] for _ in stage.layers], [[] for _ in stage.layers]
    for j, layer in enumerate(stage.layers):
        layer.register_forward_hook(lambda m, i, out, j=j: outputs[j].append(out[0].detach().clone()))
        layer.router.register_forward_hook(lambda m, i, out, j=j: routes[j].append(out[1].detach().clone()))
    masters = {param: param.detach().float().clone() for param in stage.parameters()}

    def forward_step(data_iterator, model):
        x, g = next(data_iterator)
        y = model(x)
        tokens = torch.tensor(y.numel() // H, dtype=torch.int, device=y.device)
        return y, lambda y: ((y.float() * g).sum(), tokens, {})

    for step in range(STEPS):
        for out in outputs + routes:
            out.clear()
        batches = [global_micro_batch(setup, step, m) for m in range(MICRO_BATCHES)]
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
        on_step(step, outputs, grads, routes)
        with torch.no_grad():
            for layer, layer_grads in zip(stage.layers, grads):
                for name, param in layer.named_parameters():
                    masters[param] -= LR * layer_grads[master_name(layer, name)]
                    param.copy_(masters[param])
                    param.grad = None


def run_reference(setup: Setup, routers, updates, stock=True, routed_rows=False) -> dict:
    """The one-rank run (every parallel size 1, this process alone): initial weights and, per
    router family, update mode, estimator and step, the default vectors, layer outputs and
    gradients (CPU); with ``stock``, per router family and step, those of Megatron's ``MoELayer``
    from the same weights (``ref["stock"][router]``: the baseline's reference; no update mode).
    ``routed_rows``: also the routed-row EMA where the family's default is probes."""
    cpu_copy = lambda t: t.detach().float().cpu().clone()  # noqa: E731  (a copy, never an alias)
    stage = build_stage(setup, DISPATCHERS_REFERENCE, "microbatch", {})
    weights = [{n: p.detach().cpu().clone() for n, p in layer.named_parameters()} for layer in stage.layers]
    ref = {"weights": weights, "batch": setup.batch, "runs": {}, "stock": {}}
    runs = [(router, update, estimator, False) for router in routers for update in updates
            for estimator in estimators_of(router, routed_rows)]  # fmt: skip
    runs += [(router, "microbatch", "default", True) for router in routers] if stock else []
    for router, update, estimator, is_stock in runs:
        stage = build_stage(setup, DISPATCHERS_REFERENCE, update, {}, weights, router, estimator, is_stock)
        steps = []

        def record(step, outputs, grads, routes, stage=stage, steps=steps, is_stock=is_stock):
            steps.append({
                "defaults": [cpu_copy(layer.default_vectors) for layer in stage.layers if not is_stock],
                "outputs": [[cpu_copy(o) for o in layer_outputs] for layer_outputs in outputs],
                "grads": [{k: cpu_copy(v) for k, v in g.items()} for g in grads],
                "routes": [[r.detach().cpu().clone() for r in layer_routes] for layer_routes in routes],
            })  # fmt: skip

        train(setup, stage, False, record)
        if is_stock:
            ref["stock"][router] = steps
        else:
            ref["runs"][router, update, estimator] = steps
    return ref


def estimators_of(router, routed_rows: bool) -> list[str]:
    """The runs' estimators for a family: its default, and the routed-row EMA when asked and not
    already the default."""
    return ["default"] + (["routed-rows"] if routed_rows and has_probes_by_default(router) else [])
