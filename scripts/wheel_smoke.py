"""One DefaultMoELayer forward + backward on the CPU, against the installed package (run by
scripts/wheel_check.sh from a venv holding the wheel; imports nothing from tests/).

Two layers: the paper's router (softmax with pre-softmax: the routed rows' EMA, forward mode) and
a DeepSeek-V3-like sigmoid router (its family default: probes and the shared-1 fit). Each runs
two steps; the router gets a gradient, the default vectors move, everything stays finite.
With --expect-under DIR, fails unless the package imported lies under DIR.
"""

import argparse
import os
import sys

import torch

import megatron_default_moe
from megatron_default_moe import DefaultMoEConfig, DefaultMoELayer, update_default_vectors
from megatron_default_moe.check.model import ROUTERS
from megatron_default_moe.testing import cpu

# the check's router families (megatron_default_moe.check.model), at this script's expert counts
EXPERTS = {"paper": 4, "sigmoid": 8}


def build(router: str) -> DefaultMoELayer:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=1, hidden_size=16, num_attention_heads=4, moe_ffn_hidden_size=24, ffn_hidden_size=24,
        moe_token_dispatcher_type="alltoall", moe_aux_loss_coeff=0.0, add_bias_linear=False,
        use_cpu_initialization=True, params_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0,
        num_moe_experts=EXPERTS[router], moe_router_topk=2, **{"moe_router_pre_softmax": True, **ROUTERS[router]},
    )  # fmt: skip
    spec = get_gpt_layer_local_spec(num_experts=config.num_moe_experts, moe_grouped_gemm=False)
    torch.manual_seed(0)
    layer = DefaultMoELayer(config, spec.submodules.mlp.keywords["submodules"], dm_config=DefaultMoEConfig())
    layer.set_layer_number(1)
    return layer


def steps(router: str) -> str:
    layer = build(router)
    gen = torch.Generator().manual_seed(1)
    before = layer.default_vectors.clone()
    for _ in range(2):
        layer.zero_grad(set_to_none=True)
        x_SBH = torch.randn(8, 2, 16, generator=gen).requires_grad_()
        out, _ = layer(x_SBH)
        (out * torch.randn(out.shape, generator=gen)).sum().backward()
        update_default_vectors(layer)
    grads = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
    assert out.shape == x_SBH.shape and torch.isfinite(out).all(), f"{router}: output"
    assert x_SBH.grad is not None and torch.isfinite(x_SBH.grad).all(), f"{router}: input gradient"
    assert "router.weight" in grads and grads["router.weight"].abs().sum() > 0, f"{router}: no router gradient"
    assert all(torch.isfinite(g).all() for g in grads.values()), f"{router}: non-finite gradient"
    assert torch.isfinite(layer.default_vectors).all(), f"{router}: non-finite default vectors"
    assert not torch.equal(layer.default_vectors, before), f"{router}: default vectors did not move"
    return f"{router}: {type(layer.estimator).__name__}, mode {layer.mode}, probes {layer.probes is not None}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--expect-under", metavar="DIR")
    args = parser.parse_args()
    where = os.path.realpath(megatron_default_moe.__file__)
    print(f"megatron_default_moe {megatron_default_moe.__version__} from {where}", flush=True)
    if args.expect_under and not where.startswith(os.path.realpath(args.expect_under) + os.sep):
        sys.exit(f"FAIL: megatron_default_moe imported from {where}, not from the wheel under {args.expect_under}")
    cpu.enable()
    store = torch.distributed.HashStore()  # one process: no port taken
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    cpu.init_parallel(seed=1234)
    try:
        for router in EXPERTS:
            print("layer forward + backward ok:", steps(router), flush=True)
    finally:
        cpu.destroy_parallel()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
