#!/usr/bin/env python
"""Default MoE communication per optimizer step, next to the expert-parallel all-to-all.

    # analytic only (no launch): a 32-layer, 64-expert top-8 model at EP = 8, 8 micro-batches
    python examples/benchmark_comm.py --hidden 4096 --experts 64 --topk 8 --tokens-per-rank 8192 \\
        --ep 8 --layers 32 --micro-batches 8 --dtype-bytes 2

    # plus measured step time, Default / TopK (gloo on CPU, NCCL on GPUs)
    torchrun --nproc-per-node 4 examples/benchmark_comm.py --hidden 64 --experts 8 --topk 2 \\
        --tokens-per-rank 256 --ep 4 --layers 2 --micro-batches 2

What Default MoE adds to the traffic (design §2 "Synchronisation", "Update modes"): per-expert output
sums and counts, an fp32 ``[E, H+1]`` table per MoE layer, all-reduced over the ranks of the
pipeline stage.

* ``update=microbatch`` (paper): one ``[E, H+1]`` all-reduce per MoE layer per micro-batch, launched
  asynchronously so it overlaps the combine all-to-all.
* ``update=step``: one bucketed ``[L, E, H+1]`` all-reduce per optimizer step, none in the forward.

Against it, the ``alltoall`` dispatcher moves every token's ``topk`` copies of ``hidden`` values in
each of dispatch and combine, forward and backward: ``4 x tokens x topk x hidden x dtype`` bytes per
MoE layer per micro-batch. "Sent" counts what leaves one rank: ``(EP-1)/EP`` of an all-to-all and
``2 (n-1)/n`` of a ring all-reduce over ``n`` ranks.

Under ``torchrun`` the script also builds ``--layers`` Megatron ``MoELayer``s and the same layers as
Default MoE (identical weights) at EP = ``--ep`` and times full training steps (forward + backward
of every micro-batch; ``update_default_vectors`` in step mode), TopK and Default alternating in one
run so drift hits both; it reports median step times and their ratio.
"""

import argparse
import os
import statistics
import time

import torch

MiB = 2**20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--tokens-per-rank", type=int, default=4096, help="tokens of one micro-batch on one rank")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size")
    p.add_argument("--stage-ranks", type=int, default=None, help="ranks of a pipeline stage (default: EP)")
    p.add_argument("--layers", type=int, default=1, help="MoE layers")
    p.add_argument("--micro-batches", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--dtype-bytes", type=int, default=2, help="activation bytes (2: bf16, 4: fp32)")
    p.add_argument("--iters", type=int, default=10, help="measured steps per variant (under torchrun)")
    p.add_argument("--warmup", type=int, default=2)
    return p.parse_args(argv)


def comm_rows(args):
    """``(name, collective, calls per step, bytes per call, bytes sent per rank per step)`` rows."""
    ep, n = args.ep, args.stage_ranks or args.ep
    calls_mb = args.layers * args.micro_batches
    a2a_call = args.tokens_per_rank * args.topk * args.hidden * args.dtype_bytes
    table_call = args.experts * (args.hidden + 1) * 4  # fp32 [E, H+1]
    ring, a2a_calls = 2 * (n - 1) / n, 4 * calls_mb
    return [
        ("EP all-to-all (TopK)", "all-to-all", a2a_calls, a2a_call, a2a_calls * a2a_call * (ep - 1) / ep),
        ("Default, update=microbatch", "all-reduce", calls_mb, table_call, calls_mb * table_call * ring),
        ("Default, update=step", "all-reduce", 1, args.layers * table_call, args.layers * table_call * ring),
    ]


def print_comm_table(args):
    rows = comm_rows(args)
    a2a_sent = rows[0][4]
    print(
        f"Per optimizer step, per rank: {args.layers} MoE layer(s), {args.micro_batches} micro-batch(es) of "
        f"{args.tokens_per_rank} tokens, H={args.hidden}, E={args.experts}, top-{args.topk}, "
        f"EP={args.ep}, stage of {args.stage_ranks or args.ep} rank(s), {args.dtype_bytes}-byte activations"
    )
    print(f"{'traffic':28} {'collective':11} {'calls':>6} {'MiB/call':>12} {'MiB sent':>12} {'vs a2a':>8}")
    for name, collective, calls, per_call, sent in rows:
        ratio = f"{sent / a2a_sent:.2%}" if a2a_sent else "-"
        print(f"{name:28} {collective:11} {calls:>6} {per_call / MiB:>12.4f} {sent / MiB:>12.4f} {ratio:>8}")
    return rows


# -- measured (under torchrun) --------------------------------------------------------------------
def setup_parallel(ep):
    """NCCL on GPUs (no shim), gloo with the CPU stand-ins otherwise; Megatron groups with EP = ``ep``."""
    if not torch.cuda.is_available():
        from megatron_default_moe.testing import cpu

        cpu.init_parallel(seed=1234, expert_model_parallel_size=ep)
        return torch.device("cpu")
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.distributed.init_process_group("nccl")
    parallel_state.initialize_model_parallel(expert_model_parallel_size=ep)
    model_parallel_cuda_manual_seed(1234)
    return torch.device("cuda")


def build_variants(args, device):
    """TopK, Default (microbatch), Default (step): ``--layers`` MoE layers each, identical weights."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_default_moe import DefaultMoEConfig, DefaultMoELayer

    bf16 = device.type == "cuda" and args.dtype_bytes == 2
    config = TransformerConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=1,
        ffn_hidden_size=4 * args.hidden,
        moe_ffn_hidden_size=4 * args.hidden,
        num_moe_experts=args.experts,
        moe_router_topk=args.topk,
        moe_token_dispatcher_type="alltoall",
        moe_router_pre_softmax=True,
        moe_router_score_function="softmax",
        moe_aux_loss_coeff=0.0,
        expert_model_parallel_size=args.ep,
        add_bias_linear=False,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_cpu_initialization=True,
    )
    subs = get_gpt_layer_local_spec(num_experts=args.experts).submodules.mlp.keywords["submodules"]

    def stack(make):
        layers = []
        for i in range(args.layers):
            torch.manual_seed(100 + i)
            layers.append(make(i))
        return torch.nn.ModuleList(layers).to(device)

    def default_moe(update):
        dm_config = DefaultMoEConfig(update=update)
        return lambda i: DefaultMoELayer(config, subs, layer_number=i + 1, dm_config=dm_config)

    return {
        "TopK": stack(lambda i: MoELayer(config, subs, layer_number=i + 1)),
        "Default, update=microbatch": stack(default_moe("microbatch")),
        "Default, update=step": stack(default_moe("step")),
    }


def train_step(layers, batches):
    """Forward + backward of every micro-batch, then the step-mode update (a no-op otherwise)."""
    from megatron_default_moe import update_default_vectors

    for x in batches:
        h = x
        for layer in layers:
            h, _ = layer(h)
        h.float().square().mean().backward()
    update_default_vectors(layers)
    for p in layers.parameters():
        p.grad = None


def measure(args):
    device = setup_parallel(args.ep)
    variants = build_variants(args, device)
    dtype = next(variants["TopK"].parameters()).dtype
    gen = torch.Generator().manual_seed(torch.distributed.get_rank())
    batches = [
        torch.randn(args.tokens_per_rank, 1, args.hidden, generator=gen).to(device=device, dtype=dtype)
        for _ in range(args.micro_batches)
    ]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {name: [] for name in variants}
    names = list(variants)
    for it in range(args.warmup + args.iters):
        order = names if it % 2 == 0 else names[::-1]  # alternate, so neither side always runs warm
        for name in order:
            torch.distributed.barrier()
            sync()
            start = time.perf_counter()
            train_step(variants[name], batches)
            sync()
            if it >= args.warmup:
                times[name].append(time.perf_counter() - start)
    # the slowest rank sets the step time
    medians = torch.tensor([statistics.median(times[name]) for name in names], dtype=torch.float64)
    medians = medians.to(device)
    torch.distributed.all_reduce(medians, op=torch.distributed.ReduceOp.MAX)
    return dict(zip(names, medians.cpu().tolist())), device, dtype


def main(argv=None):
    args = parse_args(argv)
    under_torchrun = "LOCAL_RANK" in os.environ
    if under_torchrun:
        world = int(os.environ["WORLD_SIZE"])
        if world % args.ep:
            raise SystemExit(f"--ep {args.ep} must divide the world size {world}")
        args.stage_ranks = args.stage_ranks or world
    rank0 = int(os.environ.get("RANK", 0)) == 0
    if rank0:
        print_comm_table(args)
    if not under_torchrun:
        return
    medians, device, dtype = measure(args)
    if rank0:
        backend = torch.distributed.get_backend()
        world = torch.distributed.get_world_size()
        print(f"\nMeasured step time ({world} ranks, {backend}, {device.type}, {dtype}; "
              f"median of {args.iters}, TopK and Default alternating):")
        print(f"{'variant':28} {'ms/step':>10} {'vs TopK':>8}")
        for name, seconds in medians.items():
            print(f"{name:28} {seconds * 1e3:>10.2f} {seconds / medians['TopK']:>8.3f}")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
