"""torchrun worker: a Default MoE checkpoint saved under one layout loads under others (gloo, CPU).

``torchrun --nproc-per-node 4 ckpt_worker.py CKPT_DIR``

1. Save layout ``ep2`` (EP=2, expert-data-parallel 2): one training forward per rank on its own
   tokens makes the table non-zero (its statistics are all-reduced, so every rank holds the same
   table), then a torch_dist checkpoint of the layer is written. The table and the eval output on a
   fixed input are kept as the reference (the same processes load later).
2. For each load layout (EP=4; TP=2 with sequence parallel and EP=2 / expert-TP 2; TP=2 with
   sequence parallel; EP=1), Megatron's groups are rebuilt, a layer with other weights loads the
   checkpoint, and every rank checks: the table is fp32 and bit-equal to the reference, and its
   eval output on its share of the fixed input equals the reference's.

Everything runs under ``if __name__ == "__main__"``: the checkpoint writer starts helper processes
with multiprocessing ``spawn``, which re-imports this file.
"""

import os
import sys

import torch

S, B, H, E = 8, 2, 16, 4
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


def save_reference(ckpt_dir, x_SBH):
    from megatron.core import dist_checkpointing

    from megatron_default_moe.testing import cpu

    name, sizes = SAVE_LAYOUT
    cpu.init_parallel(**sizes)
    layer = build_layer(sizes, seed=0)
    gen = torch.Generator().manual_seed(10 + torch.distributed.get_rank())
    layer(torch.randn(S, B, H, generator=gen))  # training forward: the EMA moves
    table = layer.default_vectors.clone()
    assert table.abs().sum() > 0 and same_on_all_ranks(table)
    if torch.distributed.get_rank() == 0:
        os.makedirs(ckpt_dir)
    torch.distributed.barrier()
    dist_checkpointing.save(layer.sharded_state_dict(), ckpt_dir)
    reference = table, eval_output(layer, x_SBH)
    cpu.destroy_parallel()
    log(f"saved {name}")
    return reference


def check_load(name, sizes, ckpt_dir, x_SBH, reference):
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from megatron_default_moe.testing import cpu

    table, out_SBH = reference
    cpu.init_parallel(**sizes)
    layer = build_layer(sizes, seed=1)
    assert not torch.allclose(eval_output(layer, x_SBH), my_tokens(out_SBH), atol=1e-3)  # other weights
    layer.load_state_dict(dist_checkpointing.load(layer.sharded_state_dict(), ckpt_dir))
    assert layer.default_vectors.dtype == torch.float32
    assert torch.equal(layer.default_vectors, table), f"{name}: table differs"
    assert ps.get_expert_model_parallel_world_size() == sizes.get("expert_model_parallel_size", 1)
    got = eval_output(layer, x_SBH)
    assert torch.allclose(got, my_tokens(out_SBH), rtol=1e-5, atol=1e-5), f"{name}: output differs"
    cpu.destroy_parallel()
    log(f"ok {name}")


def main():
    ckpt_dir = os.path.join(sys.argv[1], "ckpt")
    x_SBH = torch.randn(S, B, H, generator=torch.Generator().manual_seed(7))
    reference = save_reference(ckpt_dir, x_SBH)
    for name, sizes in LOAD_LAYOUTS.items():
        check_load(name, sizes, ckpt_dir, x_SBH, reference)
    log(f"PASSED: saved under {SAVE_LAYOUT[0]}, loaded under {len(LOAD_LAYOUTS)} layouts")


if __name__ == "__main__":
    main()
