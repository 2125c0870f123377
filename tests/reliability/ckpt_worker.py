"""torchrun worker: a Default MoE checkpoint saved under one layout loads under others (gloo, CPU).

``torchrun --nproc-per-node 4 ckpt_worker.py CKPT_DIR``

The layer is a renormalised (Mixtral / Qwen3) router at the package's defaults: probes ``auto``
and the ``shared-1`` fit, so the checkpoint carries the vectors, the fit's tables, its direction
and the micro-batch counter that seeds the probes' draws.

1. Save layout ``ep2`` (EP=2, expert-data-parallel 2): one training forward per rank on its own
   tokens makes the tables non-zero (their statistics are all-reduced, so every rank holds the
   same), then a torch_dist checkpoint of the layer is written. The tables, the counter and the
   eval output on a fixed input are kept as the reference (the same processes load later), and
   the probe pairs the next training forward draws over a fixed global batch (gathered from every
   rank, in global ``(position, sample, expert)``).
2. For each load layout (EP=4; TP=2 with sequence parallel and EP=2 / expert-TP 2; TP=2 with
   sequence parallel; EP=1), Megatron's groups are rebuilt, a layer with other weights loads the
   checkpoint, and every rank checks: every table is fp32 and bit-equal to the reference, the
   counter too, its eval output on its share of the fixed input equals the reference's, and the
   next training forward over the same global batch draws the same probe pairs (the draw is keyed
   by global token position, not by rank).

Everything runs under ``if __name__ == "__main__"``: the checkpoint writer starts helper processes
with multiprocessing ``spawn``, which re-imports this file.
"""

import os
import sys

import torch

S, B, H, E = 8, 2, 16, 4
GLOBAL_S, GLOBAL_B = 16, 8  # the global batch of the draws: 128 tokens, strata of 4 (auto: 8 x 4 experts)
SAVE_LAYOUT = ("ep2", dict(expert_model_parallel_size=2))
LOAD_LAYOUTS = {
    "ep4": dict(expert_model_parallel_size=4),
    "tp2sp-ep2-etp2": dict(tensor_model_parallel_size=2, expert_model_parallel_size=2),
    "tp2sp": dict(tensor_model_parallel_size=2),
    "ep1": dict(),
}


def log(*args):
    if torch.distributed.get_rank() == 0:
        print(*args, flush=True)


def build_layer(sizes, seed):
    """A Default MoE layer for the current parallel groups (``sizes``), initialised from ``seed``."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from helpers import moe_config, moe_submodules

    from megatron_default_moe import DefaultMoELayer

    tp = sizes.get("tensor_model_parallel_size", 1)
    config = moe_config(
        tensor_model_parallel_size=tp,
        sequence_parallel=tp > 1,
        expert_model_parallel_size=sizes.get("expert_model_parallel_size", 1),
        expert_tensor_parallel_size=tp,
        init_method_std=0.4,  # outputs of order 1
        moe_router_pre_softmax=False,  # renormalised: probes auto + shared-1 by default
    )
    torch.manual_seed(seed)
    return DefaultMoELayer(config, moe_submodules(E), layer_number=1)


def my_tokens(x_SBH):
    """This rank's share of a sequence: sequence parallel cuts ``S`` by tensor-parallel rank."""
    from megatron.core import parallel_state as ps

    return x_SBH.chunk(ps.get_tensor_model_parallel_world_size())[ps.get_tensor_model_parallel_rank()]


def eval_output(layer, x_SBH):
    layer.eval()
    with torch.no_grad():
        out, _ = layer(my_tokens(x_SBH))
    return out


def same_on_all_ranks(tensor):
    gathered = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, tensor.contiguous())
    return all(torch.equal(g, tensor) for g in gathered)


def tables(layer):
    from megatron_default_moe.checkpoint import BUFFERS

    return {name: getattr(layer, name).clone() for name in BUFFERS}


def next_draws(layer, x_SBH):
    """The probe pairs of a training forward over this rank's share of the global ``x_SBH``
    (data parallel by sample, sequence parallel by position, cut here from Megatron's ranks), as
    global ``(position, sample, expert)``, gathered from every rank."""
    from megatron.core import parallel_state as ps

    dp, tp = ps.get_data_parallel_world_size(), ps.get_tensor_model_parallel_world_size()
    seq, batch = GLOBAL_S // tp, GLOBAL_B // dp
    s0, b0 = ps.get_tensor_model_parallel_rank() * seq, ps.get_data_parallel_rank() * batch
    layer.train()
    with torch.no_grad():
        layer(x_SBH[s0 : s0 + seq, b0 : b0 + batch].contiguous())
    tokens_B, experts_B, probs_B, _ = layer.probes.last_probes
    mine = [(s0 + t // batch, b0 + t % batch, e) for t, e, p in zip(tokens_B.tolist(), experts_B.tolist(),
                                                                        probs_B.tolist()) if p < 0]  # fmt: skip
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine)
    return sorted(pair for pairs in everyone for pair in pairs)


def save_reference(ckpt_dir, x_SBH, draws_SBH):
    from megatron.core import dist_checkpointing

    from megatron_default_moe.testing import cpu

    name, sizes = SAVE_LAYOUT
    cpu.init_parallel(**sizes)
    layer = build_layer(sizes, seed=0)
    assert layer.probes is not None and layer.fit is not None  # the family's defaults
    gen = torch.Generator().manual_seed(10 + torch.distributed.get_rank())
    layer(torch.randn(S, B, H, generator=gen))  # training forward: the EMA moves
    sharded = layer.sharded_state_dict()  # writes the micro-batch counter into sample_counter
    saved = tables(layer)
    assert int(saved["sample_counter"]) == 1
    assert saved["default_vectors"].abs().sum() > 0 and saved["default_fit"].abs().sum() > 0
    assert all(same_on_all_ranks(t) for t in saved.values())
    if torch.distributed.get_rank() == 0:
        os.makedirs(ckpt_dir)
    torch.distributed.barrier()
    dist_checkpointing.save(sharded, ckpt_dir)
    reference = saved, eval_output(layer, x_SBH), next_draws(layer, draws_SBH)
    assert len(reference[2]) >= GLOBAL_S * GLOBAL_B // 4 - 4  # about one per stratum of 4 (padding: none)
    cpu.destroy_parallel()
    log(f"saved {name}")
    return reference


def check_load(name, sizes, ckpt_dir, x_SBH, draws_SBH, reference):
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from megatron_default_moe.testing import cpu

    saved, out_SBH, draws = reference
    cpu.init_parallel(**sizes)
    layer = build_layer(sizes, seed=1)
    assert not torch.allclose(eval_output(layer, x_SBH), my_tokens(out_SBH), atol=1e-3)  # other weights
    layer.load_state_dict(dist_checkpointing.load(layer.sharded_state_dict(), ckpt_dir))
    for key, table in tables(layer).items():
        assert table.dtype == saved[key].dtype and torch.equal(table, saved[key]), f"{name}: {key} differs"
    assert ps.get_expert_model_parallel_world_size() == sizes.get("expert_model_parallel_size", 1)
    got = eval_output(layer, x_SBH)
    assert torch.allclose(got, my_tokens(out_SBH), rtol=1e-5, atol=1e-5), f"{name}: output differs"
    assert next_draws(layer, draws_SBH) == draws, f"{name}: other probe pairs"
    cpu.destroy_parallel()
    log(f"ok {name}")


def main():
    ckpt_dir = os.path.join(sys.argv[1], "ckpt")
    x_SBH = torch.randn(S, B, H, generator=torch.Generator().manual_seed(7))
    draws_SBH = torch.randn(GLOBAL_S, GLOBAL_B, H, generator=torch.Generator().manual_seed(8))
    reference = save_reference(ckpt_dir, x_SBH, draws_SBH)
    for name, sizes in LOAD_LAYOUTS.items():
        check_load(name, sizes, ckpt_dir, x_SBH, draws_SBH, reference)
    log(f"PASSED: saved under {SAVE_LAYOUT[0]}, loaded under {len(LOAD_LAYOUTS)} layouts")


if __name__ == "__main__":
    main()
