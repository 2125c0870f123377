"""Probes under real process groups (``torchrun`` + gloo, CPU): they leave no trace but in the vectors.

``torchrun --nproc-per-node N probes_worker.py LAYOUT...`` loops over the layouts in one launch.
Per layout and dispatcher, two Default MoE layers with the same weights (the second with probes)
run the same micro-batches, each rank its own tokens:

1. β = 1 keeps both layers' vectors at zero (both TopK in value and gradient): the output, the input
   gradient, every parameter gradient and the aux / z losses must match to fp32 rounding on every
   rank, while the probes cross the expert-parallel all-to-all / all-gather and the expert-tensor-
   parallel split like routed rows.
2. β = 0.5: the vectors are bit-identical on every rank, and differ from the probe-free layer's.
3. ``--moe-default-fit shared-1`` (β = 0): its tables are bit-identical on every rank, and the
   direction is one power step on the covariance of every rank's probe tokens.

Prints ``ok LAYOUT/DISPATCHER`` per pass and ``PASSED: N layouts`` at the end (rank 0).
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LAYOUTS = {  # initialize_model_parallel sizes
    "ep2": dict(expert_model_parallel_size=2),
    "ep4": dict(expert_model_parallel_size=4),
    "dp2xep2": dict(expert_model_parallel_size=2),
    "tp2sp-ep2": dict(tensor_model_parallel_size=2, expert_model_parallel_size=2, expert_tensor_parallel_size=1),
    "etp2-ep2": dict(expert_model_parallel_size=2, expert_tensor_parallel_size=2),
}
ROUTER = dict(num_moe_experts=8, moe_router_topk=2, moe_router_pre_softmax=False, moe_z_loss_coeff=1e-3)


def fp32_close(a, b):
    return bool((a - b).abs().max() <= 2.0**-20 * b.abs().max().clamp_min(1e-30))


def twins(dispatcher, sizes, beta):
    from helpers import moe_config, moe_submodules

    from megatron_default_moe import DefaultMoEConfig, DefaultMoELayer

    tp = sizes.get("tensor_model_parallel_size", 1)
    config = moe_config(**ROUTER, moe_token_dispatcher_type=dispatcher, moe_aux_loss_coeff=1e-2,
                        tensor_model_parallel_size=tp, sequence_parallel=tp > 1,
                        expert_model_parallel_size=sizes.get("expert_model_parallel_size", 1),
                        expert_tensor_parallel_size=sizes.get("expert_tensor_parallel_size", tp))  # fmt: skip
    subs = moe_submodules(config.num_moe_experts)
    layers = []
    for probes in (0, 6):
        torch.manual_seed(0)
        dm = DefaultMoEConfig(beta=beta, probes=probes, probe_seed=3, fit="constant")
        layer = DefaultMoELayer(config, subs, dm_config=dm)
        layer.set_layer_number(1)
        layers.append(layer)
    layers[1].load_state_dict(layers[0].state_dict())
    return layers


def step(layer, x_SBH, grad_SBH):
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    get_moe_metrics_tracker().clear()
    layer.zero_grad(set_to_none=True)
    x = x_SBH.clone().requires_grad_()
    out, _ = layer(x)
    out.backward(grad_SBH)
    losses = {k: v.values.clone() for k, v in get_moe_metrics_tracker().metrics.items()}
    grads = {name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads, losses


def check(name, dispatcher):
    plain, probed = twins(dispatcher, LAYOUTS[name], beta=1.0)
    rank = torch.distributed.get_rank()
    failures = []
    for i in range(3):
        gen = torch.Generator().manual_seed(100 * rank + i)
        x, g = torch.randn(6, 2, 16, generator=gen), torch.randn(6, 2, 16, generator=gen)
        (o0, dx0, g0, l0), (o1, dx1, g1, l1) = step(plain, x, g), step(probed, x, g)
        if not (fp32_close(o1, o0) and fp32_close(dx1, dx0)):
            failures.append("output or input gradient")
        failures += [f"gradient of {k}" for k in g0 if not fp32_close(g1[k], g0[k])]
        if l0.keys() != l1.keys() or not l0 or any(not torch.equal(l0[k], l1[k]) for k in l0):
            failures.append("aux / z losses")
    drawn = torch.tensor([float(probed.probes.last_probes_TE.sum())])
    torch.distributed.all_reduce(drawn)
    for layer in (plain, probed):
        layer.dm_config.beta = 0.5
        step(layer, x, g)
    table = [torch.zeros_like(probed.default_vectors) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(table, probed.default_vectors)
    if any(not torch.equal(t, table[0]) for t in table):
        failures.append("default vectors differ across ranks")
    if torch.equal(plain.default_vectors, probed.default_vectors) or drawn.item() == 0:
        failures.append("the probes never reached the statistics")
    failures += auto_budget_failures(plain)
    failures += fit_failures(plain, x, g)
    return sorted(set(failures))


def fit_failures(plain, x, g):
    from helpers import moe_submodules

    from megatron_default_moe import DefaultMoEConfig, DefaultMoELayer

    dm = DefaultMoEConfig(beta=0.0, probes=6, probe_seed=3, fit="shared-1", fit_beta=0.0)
    fitted = DefaultMoELayer(plain.config, moe_submodules(plain.config.num_moe_experts), dm_config=dm)
    fitted.load_state_dict(plain.state_dict(), strict=False)
    fitted.set_layer_number(1)
    d0 = fitted.fit.initial_direction
    step(fitted, x, g)
    failures = []
    for name in ("default_vectors", "default_fit", "default_direction"):
        table = getattr(fitted, name)
        tables = [torch.zeros_like(table) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(tables, table)
        if any(not torch.equal(t, tables[0]) for t in tables):
            failures.append(f"{name} differs across ranks")
    if not fitted.default_fit.any():
        failures.append("the fit took no statistics")
    tokens_B, _, probs_B, _ = fitted.probes.last_probes  # this rank's probe tokens, summed over the stage
    x_NH = x.reshape(-1, x.shape[-1])[tokens_B[probs_B < 0]]
    s_N1 = x_NH @ d0[:, None]
    sums = torch.cat([(x_NH * s_N1).sum(0), x_NH.sum(0), torch.tensor([float(len(x_NH))])])
    torch.distributed.all_reduce(sums)
    hidden, n = x.shape[-1], sums[-1]
    sum_xs, sum_x = sums[:hidden], sums[hidden : 2 * hidden]
    want = (sum_xs - sum_x * (sum_x @ d0) / n) / n
    if not torch.allclose(fitted.default_direction, want, rtol=1e-4, atol=1e-5):
        failures.append("the direction is not a power step on the stage's probe tokens")
    return failures


def auto_budget_failures(plain):
    """``--moe-default-probes auto`` sizes the budget by the stage's token sets (every rank here:
    sequence parallelism wherever TP > 1)."""
    from helpers import moe_submodules

    from megatron_default_moe import DefaultMoEConfig, DefaultMoELayer
    from megatron_default_moe.estimators.probes import auto_probe_budget

    experts = plain.config.num_moe_experts
    auto = DefaultMoELayer(plain.config, moe_submodules(experts), dm_config=DefaultMoEConfig(probes="auto"))
    want = auto_probe_budget(experts, torch.distributed.get_world_size())
    return [] if auto.probes is not None and auto.probes.budget == want else [f"auto budget, want {want}"]


def main():
    from helpers import finish_worker, report_case

    from megatron_default_moe.testing import cpu

    names, failed = sys.argv[1:], False
    for name in names:
        cpu.init_parallel(seed=1234, **LAYOUTS[name])
        for dispatcher in ("allgather", "alltoall"):
            failed |= report_case(f"{name}/{dispatcher}", check(name, dispatcher))
        cpu.destroy_parallel()
    finish_worker(failed, f"{len(names)} layouts")


if __name__ == "__main__":
    main()
