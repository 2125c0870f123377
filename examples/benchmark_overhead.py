#!/usr/bin/env python
"""What Default MoE costs over TopK: step time, memory, communication (paper shapes).

    python examples/benchmark_overhead.py                          # CPU: small token counts, ~1-2 min
    python examples/benchmark_overhead.py --tokens 16384 --model-seq 4096   # GPU-sized runs
    python examples/benchmark_overhead.py --configs 8c1 --iters 5 --model-layers 0   # smoke

Paper shapes (arXiv 2504.12463): hidden 1024; 8 experts of FFN 2816 (8c1, 8c2) or 32 experts of
FFN 704 (32c1, 32c4), ``NcK`` = N experts, top-K. For each configuration:

1. One MoE layer: Megatron's ``MoELayer`` and ``DefaultMoELayer`` with identical weights, forward +
   backward on the same tokens. Iterations are interleaved (TopK, Default, Default, TopK, ...: the
   order alternates so neither side always runs warm) and the ratio is median(Default) / median(TopK).
2. A small ``GPTModel`` (``--model-layers`` MoE layers at the same shapes), the same way.
3. Memory: parameter + buffer bytes of each (the default vectors: N x H fp32 per layer) and, on
   CUDA, ``torch.cuda.max_memory_allocated`` over one step of each.
4. Communication, analytic: one fp32 ``[N, H+1]`` all-reduce per MoE layer per micro-batch
   (``update=microbatch``; ``update=step``: one per layer per optimizer step, bucketed), against
   the all-to-all bytes the dispatcher already moves for the same tokens.

Single process: gloo with the CPU stand-ins on CPU, NCCL and no shim on CUDA (bf16 there).
"""

import argparse
import os
import platform
import statistics
import time

import torch

CONFIGS = {"8c1": (8, 2816, 1), "8c2": (8, 2816, 2), "32c1": (32, 704, 1), "32c4": (32, 704, 4)}


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="8c1,8c2,32c1,32c4", help=f"comma list of {list(CONFIGS)}")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=16384 if cuda else 512, help="tokens, single-layer runs")
    p.add_argument("--iters", type=int, default=50 if cuda else 15, help="timed iterations per variant")
    p.add_argument("--warmup", type=int, default=5 if cuda else 2)
    p.add_argument("--model-layers", type=int, default=2, help="MoE layers of the small GPT (0: skip)")
    p.add_argument("--model-seq", type=int, default=2048 if cuda else 256)
    p.add_argument("--model-batch", type=int, default=2 if cuda else 1)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--dtype", default="bf16" if cuda else "fp32", choices=("fp32", "bf16"))
    p.add_argument("--ranks", type=int, default=8, help="ranks of the stage, for the all-reduce traffic")
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args(argv)


def _free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def setup():
    """A one-process world (gloo + CPU stand-ins, or NCCL) and Megatron's groups, all sizes 1."""
    if "RANK" not in os.environ:  # not under a launcher: never reuse an inherited port
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", _free_port()
    if torch.cuda.is_available():
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl", rank=0, world_size=1)
        torch.cuda.set_device(0)
        parallel_state.initialize_model_parallel()
        model_parallel_cuda_manual_seed(1234)
        return torch.device("cuda")
    from megatron_default_moe.testing import cpu

    cpu.init_parallel(seed=1234)
    return torch.device("cpu")


def machine():
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} CPUs visible, torch threads {torch.get_num_threads()}"


def transformer_config(args, experts, ffn, topk, layers=1):
    from megatron.core.transformer.transformer_config import TransformerConfig

    bf16 = args.dtype == "bf16"
    return TransformerConfig(
        num_layers=layers,
        hidden_size=args.hidden,
        num_attention_heads=max(1, args.hidden // 64),
        ffn_hidden_size=4 * args.hidden,
        num_moe_experts=experts,
        moe_ffn_hidden_size=ffn,
        moe_router_topk=topk,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=True,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=0.01,
        moe_token_dispatcher_type="alltoall",
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_cpu_initialization=not torch.cuda.is_available(),
        apply_rope_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
    )


def dtype_of(args):
    return torch.bfloat16 if args.dtype == "bf16" else torch.float32


# -- builders --------------------------------------------------------------------------------------
def build_layer_pair(args, experts, ffn, topk, device):
    """``(TopK MoELayer, DefaultMoELayer)`` with identical weights (local spec, SequentialMLP)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_default_moe import DefaultMoEConfig, DefaultMoELayer

    config = transformer_config(args, experts, ffn, topk)
    subs = get_gpt_layer_local_spec(num_experts=experts).submodules.mlp.keywords["submodules"]
    torch.manual_seed(args.seed)
    stock = MoELayer(config, subs, layer_number=1).to(device=device, dtype=dtype_of(args))
    default = DefaultMoELayer(config, subs, layer_number=1, dm_config=DefaultMoEConfig())
    default = default.to(device=device, dtype=dtype_of(args))
    copy_weights(stock, default)
    return stock, default


def build_model_pair(args, experts, ffn, topk, device):
    """``(TopK GPTModel, Default MoE GPTModel)``: all layers MoE, identical weights."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.module import Float16Module

    from megatron_default_moe import to_default_moe_spec

    models = []
    for default_moe in (False, True):
        config = transformer_config(args, experts, ffn, topk, layers=args.model_layers)
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
        if default_moe:
            spec = to_default_moe_spec(spec)
        torch.manual_seed(args.seed)
        model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=args.vocab,
                         max_sequence_length=args.model_seq, position_embedding_type="rope")
        model = model.to(device)
        if config.bf16:
            model = Float16Module(config, model)
        models.append(model)
    copy_weights(*models)
    return models


def copy_weights(stock, default):
    """Load the TopK module's weights into its Default MoE twin (which keeps its zero vectors)."""
    state = stock.state_dict()
    state.update({k: v for k, v in default.state_dict().items() if k.endswith("default_vectors")})
    default.load_state_dict(state)


# -- measurement -----------------------------------------------------------------------------------
def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(step):
    sync()
    t0 = time.perf_counter()
    step()
    sync()
    return time.perf_counter() - t0


def interleaved_times(steps, iters, warmup):
    """Seconds of every step in ``steps`` per iteration, in rotating order (A B C, B C A, C A B, ...),
    so that no step always runs first (cold) or right after the same neighbour."""
    for _ in range(warmup):
        for step in steps:
            step()
    times = [[] for _ in steps]
    for i in range(iters):
        for k in range(len(steps)):
            j = (i + k) % len(steps)
            times[j].append(timed(steps[j]))
    return times


def paired_ratio(num, den):
    """Median and quartiles of the per-iteration ratios ``num[i] / den[i]`` (drift cancels out)."""
    ratios = sorted(a / b for a, b in zip(num, den))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {"median": statistics.median(ratios), "q1": q[0], "q3": q[2]}


def measure(steps, args):
    """Interleave TopK, Default MoE and TopK again; the TopK/TopK ratio is the noise floor."""
    t_topk, t_default, t_control = interleaved_times(steps + steps[:1], args.iters, args.warmup)
    return {
        "topk_s": statistics.median(t_topk),
        "default_s": statistics.median(t_default),
        "ratio": paired_ratio(t_default, t_topk),
        "control": paired_ratio(t_control, t_topk),
    }


def extra_flops_fraction(experts, hidden, ffn, topk):
    """Analytic extra FLOPs of Default MoE over the experts' own, forward + backward, per token.

    Experts: ``K`` x (fc1 + fc2) = ``2 * 2 H F`` forward, twice that backward. Default MoE: the
    term ``w @ Ê`` (``2 E H``) forward, ``dL/dw`` (``2 E H``) backward (no gradient into ``Ê``);
    the statistics (``out / p``, an index-add) are ``O(K H)`` elementwise and left out.
    """
    return (4 * experts * hidden) / (3 * topk * 4 * hidden * ffn)


def peak_bytes(step):
    """CUDA peak allocated bytes over one step (``None`` on CPU)."""
    if not torch.cuda.is_available():
        return None
    sync()
    torch.cuda.reset_peak_memory_stats()
    step()
    sync()
    return torch.cuda.max_memory_allocated()


def state_bytes(module):
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def layer_step(layer, x, g):
    def step():
        layer.zero_grad(set_to_none=True)
        out, _ = layer(x)
        (out * g).sum().backward()

    return step


def model_step(model, tokens, position_ids, labels):
    def step():
        model.zero_grad(set_to_none=True)
        loss = model(tokens, position_ids, None, labels=labels)
        loss.float().mean().backward()

    return step


def comm_bytes(experts, hidden, topk, tokens, ranks, layers=1):
    """Analytic bytes per micro-batch: Default MoE's all-reduce vs the dispatcher's all-to-all."""
    payload = layers * experts * (hidden + 1) * 4  # fp32 [E, H+1]
    ring = 2 * (ranks - 1) / ranks * payload  # sent (and received) per rank by a ring all-reduce
    # alltoall dispatcher, per rank, bf16 activations: dispatch + combine in forward, both again
    # in backward; a fraction (ranks-1)/ranks of the rows leaves the rank.
    a2a = layers * 4 * tokens * topk * hidden * 2 * (ranks - 1) / ranks
    return payload, ring, a2a


def fmt_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def main():
    args = parse_args()
    import warnings

    warnings.filterwarnings("ignore")
    device = setup()
    print(f"machine: {machine()}; torch {torch.__version__}; dtype {args.dtype}")
    print(f"single layer: {args.tokens} tokens; model: {args.model_layers} MoE layers, "
          f"{args.model_batch} x {args.model_seq} tokens, vocab {args.vocab}; "
          f"{args.iters} interleaved iterations per variant, medians\n")
    rows = []
    for name in args.configs.split(","):
        experts, ffn, topk = CONFIGS[name]
        row = {"config": name}
        torch.manual_seed(0)
        stock, default = build_layer_pair(args, experts, ffn, topk, device)
        x = torch.randn(args.tokens, 1, args.hidden, device=device, dtype=dtype_of(args))
        g = torch.randn_like(x)
        steps = [layer_step(stock, x, g), layer_step(default, x, g)]
        row["layer"] = measure(steps, args)
        row["layer_extra_state"] = state_bytes(default) - state_bytes(stock)
        row["layer_state"] = state_bytes(stock)
        row["layer_peak"] = [peak_bytes(s) for s in steps]
        del stock, default, steps
        if args.model_layers > 0:
            models = build_model_pair(args, experts, ffn, topk, device)
            tokens = torch.randint(0, args.vocab, (args.model_batch, args.model_seq), device=device)
            position_ids = torch.arange(args.model_seq, device=device).unsqueeze(0).expand_as(tokens)
            labels = torch.roll(tokens, -1, dims=1)
            steps = [model_step(m, tokens, position_ids, labels) for m in models]
            row["model"] = measure(steps, args)
            row["model_extra_state"] = state_bytes(models[1]) - state_bytes(models[0])
            row["model_state"] = state_bytes(models[0])
            row["model_peak"] = [peak_bytes(s) for s in steps]
            del models, steps
        row["extra_flops"] = extra_flops_fraction(experts, args.hidden, ffn, topk)
        payload, ring, a2a = comm_bytes(experts, args.hidden, topk, args.tokens, args.ranks)
        row.update(ar_payload=payload, ar_ring=ring, a2a=a2a)
        rows.append(row)
        print(f"  {name}: layer {row['layer']['ratio']['median']:.4f}"
              + (f", model {row['model']['ratio']['median']:.4f}" if args.model_layers else ""), flush=True)
    print_table(args, rows)
    return rows


def _ratio(r):
    return f"{r['median']:.4f} [{r['q1']:.3f}-{r['q3']:.3f}]"


def print_table(args, rows):
    print("\nStep time (forward + backward). ratio = median over iterations of Default MoE / TopK "
          "[quartiles];\nA/A = TopK / TopK measured the same way (the noise floor); extra FLOPs = analytic, "
          "vs the experts' FLOPs:")
    parts = [("layer", "layer")] + ([("model", "model")] if args.model_layers else [])
    head = f"{'config':>6} | {'extra FLOPs':>11}"
    for _, label in parts:
        head += f" | {label + ' TopK ms':>13} {'Default ms':>10} {'ratio [IQR]':>22} {'A/A':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        line = f"{r['config']:>6} | {100 * r['extra_flops']:>10.3f}%"
        for key, _ in parts:
            m = r[key]
            line += (f" | {1e3 * m['topk_s']:>13.2f} {1e3 * m['default_s']:>10.2f} {_ratio(m['ratio']):>22} "
                     f"{m['control']['median']:>7.4f}")
        print(line)

    print("\nMemory (Default MoE extra):")
    head = f"{'config':>6} | {'layer state':>11} {'extra':>10} {'%':>7}"
    if args.model_layers:
        head += f" | {'model state':>11} {'extra':>10} {'%':>7}"
    if torch.cuda.is_available():
        head += f" | {'peak TopK':>10} {'peak Default':>12} {'%':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        line = (f"{r['config']:>6} | {fmt_bytes(r['layer_state']):>11} {fmt_bytes(r['layer_extra_state']):>10} "
                f"{100 * r['layer_extra_state'] / r['layer_state']:>6.3f}%")
        if args.model_layers:
            line += (f" | {fmt_bytes(r['model_state']):>11} {fmt_bytes(r['model_extra_state']):>10} "
                     f"{100 * r['model_extra_state'] / r['model_state']:>6.3f}%")
        if torch.cuda.is_available():
            p = r["model_peak"] if args.model_layers else r["layer_peak"]
            line += f" | {fmt_bytes(p[0]):>10} {fmt_bytes(p[1]):>12} {100 * (p[1] - p[0]) / p[0]:>6.2f}%"
        print(line)

    print(f"\nCommunication per MoE layer per micro-batch (analytic; {args.ranks} ranks, {args.tokens} "
          f"tokens per rank, bf16 all-to-all):")
    head = f"{'config':>6} | {'all-reduce [N,H+1] fp32':>23} {'ring bytes/rank':>15} | {'all-to-all bytes/rank':>21} {'extra':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['config']:>6} | {fmt_bytes(r['ar_payload']):>23} {fmt_bytes(r['ar_ring']):>15} | "
              f"{fmt_bytes(r['a2a']):>21} {100 * r['ar_ring'] / r['a2a']:>6.2f}%")


if __name__ == "__main__":
    main()
