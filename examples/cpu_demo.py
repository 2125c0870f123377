#!/usr/bin/env python
"""TopK vs Default MoE on a small Megatron-Core GPT MoE, trained on CPU with expert parallelism.

    make demo                                  # = python examples/cpu_demo.py (~3 min on 2 CPU cores)
    python examples/cpu_demo.py --steps 1000 --seed 7         # a longer run, another seed
    python examples/cpu_demo.py --moe-default-update step    # one EMA update per optimizer step

What it does, all through Megatron-Core's own code paths:

1. Data: the Python standard library's source (found via ``sysconfig``, no download) as a byte-level
   Megatron ``IndexedDataset`` (``.bin``/``.idx``), then ``GPTDataset`` train / valid splits from
   ``BlendedMegatronDatasetBuilder`` (``megatron_default_moe.testing.data``).
2. Two ``GPTModel``s from the same seed (identical weights): Megatron's GPT block spec (first layer
   dense, then MoE layers with 8 experts, top-1, full-softmax probs as in the paper) and the same spec
   through ``to_default_moe_spec``. Each is wrapped in Megatron's ``DistributedDataParallel`` with
   Megatron's Adam; every step runs ``forward_backward_no_pipelining`` on the same batch for both.
3. Launches itself under ``torchrun`` (2 ranks, EP = 2; gloo + ``megatron_default_moe.testing.cpu`` on
   CPU, NCCL without any shim on GPUs). Prints a progress bar, a table of train / valid loss every
   ``--eval-interval`` steps, the router-gradient cosines of ``megatron_default_moe.analysis.diagnostics``
   (paper Fig. 4) and the default vectors' statistics; writes PNG plots and a JSON of all numbers to
   ``--out`` (default ``out/``).

At this size (about 1.3M parameters, 300 steps of 16 x 128 bytes) the TopK / Default MoE loss gap is
within seed-to-seed variation; the paper's gains were measured at 2B parameters and 320B tokens.
What the demo shows reliably is the mechanism: the same Megatron training path, default vectors
that fill in, a router gradient closer to the dense one, and the cost (next to none).
"""

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from functools import partial

import torch


# routing family -> (what it stands for, TransformerConfig routing fields; ROUTERS.md §2)
ROUTERS = {
    "paper": ("softmax with pre-softmax (OLMoE, Qwen2, paper)",
              dict(moe_router_score_function="softmax", moe_router_pre_softmax=True)),
    "mixtral": ("softmax after top-k, renormalised (Mixtral, Qwen3, GPT-OSS)",
                dict(moe_router_score_function="softmax", moe_router_pre_softmax=False)),
    "deepseek-v3": ("sigmoid, expert bias, groups 4/2, scaling 2.5, a shared expert (DeepSeek-V3, Kimi, GLM)",
                    dict(moe_router_score_function="sigmoid", moe_router_pre_softmax=False,
                         moe_router_enable_expert_bias=True, moe_router_bias_update_rate=1e-3,
                         moe_router_num_groups=4, moe_router_group_topk=2, moe_router_topk_scaling_factor=2.5)),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_argument_group("run")
    g.add_argument("--steps", type=int, default=300)
    g.add_argument("--eval-interval", type=int, default=25)
    g.add_argument("--eval-iters", type=int, default=4, help="validation micro-batches per rank")
    g.add_argument("--nproc", type=int, default=None, help="ranks (default: 2 on CPU, #GPUs on CUDA)")
    g.add_argument("--ep", type=int, default=None, help="expert parallel size (default: min(2, nproc))")
    g.add_argument("--out", default="out")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--corpus-bytes", type=int, default=8 << 20)
    g.add_argument("--no-plot", action="store_true")
    g.add_argument("--no-diagnostics", action="store_true")
    g = p.add_argument_group("model")
    g.add_argument("--router", default="paper", choices=sorted(ROUTERS),
                   help="routing family: " + "; ".join(f"{k}: {v[0]}" for k, v in sorted(ROUTERS.items())))
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--hidden", type=int, default=128)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--experts", type=int, default=8)
    g.add_argument("--topk", type=int, default=1)
    g.add_argument("--moe-ffn", type=int, default=None, help="expert FFN size (default: 2.75 * hidden)")
    g.add_argument("--first-layer-dense", type=int, default=1, choices=(0, 1))
    g.add_argument("--aux-loss", type=float, default=0.01, help="global load-balancing loss coeff")
    g.add_argument("--dispatcher", default="alltoall", choices=("alltoall", "allgather"))
    g = p.add_argument_group("training")
    g.add_argument("--seq-len", type=int, default=128)
    g.add_argument("--micro-batch", type=int, default=8, help="sequences per rank per micro-batch")
    g.add_argument("--micro-batches", type=int, default=1, help="micro-batches per step")
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--warmup", type=int, default=20)
    g = p.add_argument_group("Default MoE")
    g.add_argument("--moe-default-ema-beta", type=float, default=0.9)
    g.add_argument("--moe-default-ema-weighting", default="uniform", choices=("uniform", "router"))
    g.add_argument("--moe-default-update", default="microbatch", choices=("microbatch", "step"))
    g.add_argument("--moe-default-mode", default="auto", choices=("auto", "forward", "backward-only"))
    g.add_argument("--moe-default-normaliser", default="selected", choices=("selected", "all"))
    g.add_argument("--moe-default-stats-stride", type=int, default=1)
    g.add_argument("--moe-default-probes", type=lambda v: v if v == "auto" else int(v), default=None,
                   help="a budget, 'auto', or unset: the package's default (auto for renormalised and sigmoid routers)")
    g.add_argument("--moe-default-probe-draw", default="uniform", choices=("uniform", "weighted"))
    g.add_argument("--moe-default-fit", default=None, choices=("constant", "shared-1"),
                   help="unset: the package's default (shared-1 for renormalised and sigmoid routers with probes)")
    g.add_argument("--moe-default-fit-beta", type=float, default=None)
    return p.parse_args(argv)


# -- launch ----------------------------------------------------------------------------------------
def relaunch_under_torchrun(args):
    """Re-run this script with ``torchrun --nproc-per-node N`` unless already under torchrun."""
    nproc = args.nproc or (torch.cuda.device_count() if torch.cuda.is_available() else 2)
    if "LOCAL_RANK" in os.environ or nproc == 1:
        return False
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    sys.exit(subprocess.call(cmd + [os.path.abspath(__file__)] + sys.argv[1:], env=env))


def setup_parallel(args):
    """gloo + CPU stand-ins on CPU, NCCL on GPUs; Megatron's groups with EP = ``args.ep``."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    args.ep = args.ep or min(2, world)
    if torch.cuda.is_available():
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        if not torch.distributed.is_initialized():
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
            torch.distributed.init_process_group("nccl", rank=int(os.environ.get("RANK", 0)), world_size=world)
        parallel_state.initialize_model_parallel(expert_model_parallel_size=args.ep)
        model_parallel_cuda_manual_seed(args.seed)
        torch.manual_seed(args.seed)
        return torch.device("cuda")
    from megatron_default_moe.testing import cpu

    cpu.init_parallel(seed=args.seed, expert_model_parallel_size=args.ep)
    return torch.device("cpu")


def is_rank0():
    return torch.distributed.get_rank() == 0


def log(*a, **k):
    if is_rank0():
        print(*a, **k, flush=True)


# -- model -----------------------------------------------------------------------------------------
def transformer_config(args):
    from megatron.core.transformer.transformer_config import TransformerConfig

    moe_layers = [0] * args.first_layer_dense + [1] * (args.layers - args.first_layer_dense)
    return TransformerConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        ffn_hidden_size=4 * args.hidden,
        num_moe_experts=args.experts,
        moe_ffn_hidden_size=args.moe_ffn or int(2.75 * args.hidden),
        moe_router_topk=args.topk,
        moe_layer_freq=moe_layers,
        **ROUTERS[args.router][1],
        moe_shared_expert_intermediate_size=args.hidden if args.router == "deepseek-v3" else None,
        moe_router_load_balancing_type="global_aux_loss",
        moe_aux_loss_coeff=args.aux_loss,
        moe_token_dispatcher_type=args.dispatcher,
        expert_model_parallel_size=args.ep,
        normalization="RMSNorm",
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=torch.float32,
        use_cpu_initialization=not torch.cuda.is_available(),
        apply_rope_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
    )


def build_model(args, default_moe):
    """Megatron's GPT (local spec), optionally in its Default MoE form; same weights for a seed."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_default_moe import DefaultMoEConfig, to_default_moe_spec

    config = transformer_config(args)
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
    if default_moe:
        dm_config = DefaultMoEConfig(
            beta=args.moe_default_ema_beta,
            ema_weighting=args.moe_default_ema_weighting,
            update=args.moe_default_update,
            mode=args.moe_default_mode,
            normaliser=args.moe_default_normaliser,
            stats_stride=args.moe_default_stats_stride,
            probes=args.moe_default_probes,
            probe_draw=args.moe_default_probe_draw,
            probe_seed=args.seed,
            fit=args.moe_default_fit,
            fit_beta=args.moe_default_fit_beta,
        )
        spec = to_default_moe_spec(spec, dm_config)
    torch.manual_seed(args.seed)
    if torch.cuda.is_available():
        model_parallel_cuda_manual_seed(args.seed)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=258,
        max_sequence_length=args.seq_len,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
    )
    return model.to(torch.cuda.current_device() if torch.cuda.is_available() else "cpu")


class Run:
    """One model with Megatron's DDP wrapper, Adam, LR schedule, and its loss history."""

    def __init__(self, name, args, default_moe):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        from megatron_default_moe import wrap_finalize_model_grads

        self.name, self.args = name, args
        module = build_model(args, default_moe)
        self.config = module.config
        self.model = DistributedDataParallel(
            config=self.config,
            ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
            module=module,
        )
        self.config.no_sync_func = self.model.no_sync
        self.config.finalize_model_grads_func = finalize_model_grads
        if default_moe and args.moe_default_update == "step":
            wrap_finalize_model_grads(self.config)  # one bucketed EMA update per optimizer step
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=args.lr,
                min_lr=args.lr / 10,
                weight_decay=0.1,
                adam_beta1=0.9,
                adam_beta2=0.95,
                # Megatron's grad clipping asserts CUDA tensors: clip on GPU only.
                clip_grad=1.0 if torch.cuda.is_available() else 0.0,
                params_dtype=torch.float32,
            ),
            [self.model],
        )
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0,
            max_lr=args.lr,
            min_lr=args.lr / 10,
            lr_warmup_steps=min(args.warmup, args.steps // 5),
            lr_decay_steps=args.steps,
            lr_decay_style="cosine",
            start_wd=0.1,
            end_wd=0.1,
            wd_incr_steps=args.steps,
            wd_incr_style="constant",
        )
        self.train_loss, self.valid_loss, self.cosines = [], {}, {}

    @property
    def module(self):
        return self.model.module

    def _run(self, batches, forward_only):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        out = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(batches),
            model=[self.model],
            num_microbatches=len(batches),
            seq_length=self.args.seq_len,
            micro_batch_size=self.args.micro_batch,
            forward_only=forward_only,
        )
        return global_mean_loss(out)

    def train_step(self, batches):
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss = self._run(batches, forward_only=False)
        self.optimizer.step()
        self.scheduler.step(increment=1)
        self.train_loss.append(loss)
        return loss

    @torch.no_grad()
    def evaluate(self, batches):
        self.model.eval()
        loss = self._run(batches, forward_only=True)
        self.model.train()
        return loss


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


def loss_func(loss_mask, per_token_loss):
    """Megatron's 3-tuple convention: (summed loss, token count, what to report)."""
    mask = loss_mask.reshape(-1).float()
    loss_sum = (per_token_loss.float().reshape(-1) * mask).sum()
    count = mask.sum()
    return loss_sum, count.to(torch.int), {"lm loss": torch.stack([loss_sum.detach(), count])}


def global_mean_loss(reports):
    """Token-weighted mean of the ``lm loss`` reports over micro-batches and data-parallel ranks."""
    from megatron.core import parallel_state

    total = torch.stack([r["lm loss"] for r in reports]).sum(0).double()
    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return (total[0] / total[1]).item()


# -- data ------------------------------------------------------------------------------------------
def load_data(args, device):
    """Train / valid ``GPTDataset``s of the byte-level stdlib corpus (built once, on rank 0)."""
    from megatron.core import parallel_state

    from megatron_default_moe.testing.data import build_gpt_datasets, write_byte_corpus

    prefix = os.path.join(args.out, "data", f"pystdlib_bytes_{args.corpus_bytes}")
    if is_rank0():
        write_byte_corpus(prefix, max_bytes=args.corpus_bytes, seed=args.seed)
    torch.distributed.barrier()
    dp = parallel_state.get_data_parallel_world_size()
    per_step = args.micro_batch * args.micro_batches * dp
    train, valid, _ = build_gpt_datasets(
        prefix,
        args.seq_len,
        [args.steps * per_step, args.eval_iters * args.micro_batch * dp, 0],
        seed=args.seed,
        split="95,5,0",
    )
    return train, valid


def micro_batches(dataset, first_sample, count, args, device):
    """``count`` micro-batches of this data-parallel rank, starting at global sample ``first_sample``."""
    from megatron.core import parallel_state

    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    out = []
    for m in range(count):
        start = first_sample + (m * dp + rank) * args.micro_batch
        samples = [dataset[(start + j) % len(dataset)] for j in range(args.micro_batch)]
        batch = torch.utils.data.default_collate(samples)
        out.append({k: v.to(device) for k, v in batch.items()})
    return out


# -- diagnostics and reporting ----------------------------------------------------------------------
def measure_cosines(run, batch):
    """Router-gradient cosines to the dense gradient on one micro-batch (paper Fig. 4)."""
    from megatron_default_moe.analysis.diagnostics import router_gradient_cosines

    def loss_fn(model):
        per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return (per_token * batch["loss_mask"]).sum() / batch["loss_mask"].sum()

    return router_gradient_cosines(run.module, loss_fn)


def progress(iterable, total):
    if not is_rank0():
        return iterable
    try:
        from tqdm import tqdm

        return tqdm(iterable, total=total, ncols=100, file=sys.stdout, mininterval=1.0)
    except ImportError:
        return _SimpleBar(iterable, total)


class _SimpleBar:
    def __init__(self, iterable, total):
        self.iterable, self.total, self.postfix, self.t0 = iterable, total, "", time.time()

    def __iter__(self):
        for i, x in enumerate(self.iterable, 1):
            yield x
            if i % max(1, self.total // 40) == 0 or i == self.total:
                done = int(30 * i / self.total)
                print(f"\r[{'#' * done}{'.' * (30 - done)}] {i}/{self.total} {self.postfix} "
                      f"{time.time() - self.t0:.0f}s", end="", flush=True)
        print()

    def set_postfix_str(self, s):
        self.postfix = s

    def write(self, s):
        print(s)


def loss_table(steps, runs):
    """Side-by-side table: train loss (mean over the interval) and valid loss at each checkpoint."""
    topk, dm = runs
    head = (f"{'step':>5} | {'train TopK':>10} {'train Default':>13} {'diff':>7} | "
            f"{'valid TopK':>10} {'valid Default':>13} {'diff':>7}")
    rows = [head, "-" * len(head)]
    prev = 0
    for s in steps:
        va = [r.valid_loss[s] for r in runs]
        if s > prev:
            tr = [sum(r.train_loss[prev:s]) / (s - prev) for r in runs]
            train = f"{tr[0]:>10.4f} {tr[1]:>13.4f} {tr[1] - tr[0]:>+7.4f}"
        else:
            train = f"{'-':>10} {'-':>13} {'':>7}"
        rows.append(f"{s:>5} | {train} | {va[0]:>10.4f} {va[1]:>13.4f} {va[1] - va[0]:>+7.4f}")
        prev = s
    return "\n".join(rows)


def cosine_table(steps, runs):
    """Per checkpoint and MoE layer: cosine to the dense router gradient of (TopK model, TopK
    routing), (Default MoE model, TopK routing), (Default MoE model, its own gradient)."""
    topk, dm = runs
    layers = sorted(dm.cosines[steps[-1]])
    head = f"{'step':>5} | " + " | ".join(f"{'layer ' + str(n):^23}" for n in layers)
    sub = f"{'':>5} | " + " | ".join(f"{'T:topk':>7} {'D:topk':>7} {'D:dflt':>7}" for _ in layers)
    rows = [head, sub, "-" * len(sub)]
    for s in steps:
        cells = [f"{topk.cosines[s][n]['topk']:>7.3f} {dm.cosines[s][n]['topk']:>7.3f} "
                 f"{dm.cosines[s][n]['default']:>7.3f}" for n in layers]
        rows.append(f"{s:>5} | " + " | ".join(cells))
    later = [s for s in steps if s > 0] or steps
    mean = [sum(c[s][n][v] for s in later for n in layers) / (len(later) * len(layers))
            for c, v in ((topk.cosines, "topk"), (dm.cosines, "topk"), (dm.cosines, "default"),
                         (dm.cosines, "extra_ratio"))]
    rows.append(f"{'mean':>5} | T:topk {mean[0]:.3f}, D:topk {mean[1]:.3f}, D:dflt {mean[2]:.3f} "
                f"(checkpoints after step 0, all layers); extra router gradient ‖D−T‖/‖T‖ {mean[3]:.3f}")
    return "\n".join(rows)


def plot_losses(steps, runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for run, color in zip(runs, ("tab:blue", "tab:red")):
        k = max(1, len(run.train_loss) // 50)
        smooth = [sum(run.train_loss[max(0, i - k + 1):i + 1]) / len(run.train_loss[max(0, i - k + 1):i + 1])
                  for i in range(len(run.train_loss))]
        ax.plot(range(1, len(smooth) + 1), smooth, color=color, alpha=0.6, lw=1, label=f"{run.name} train")
        ax.plot(steps, [run.valid_loss[s] for s in steps], "o-", color=color, lw=2, label=f"{run.name} valid")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / byte)")
    ax.set_title("Megatron-Core GPT MoE on CPU: TopK vs Default MoE")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def default_vector_report(run, batch):
    """Per-layer statistics of the trained default vectors (and the default term's share)."""
    from megatron_default_moe import default_moe_layers
    from megatron_default_moe.analysis.vector_quality import default_vector_stats

    layers = default_moe_layers(run.module)
    for layer in layers:
        layer.track_metrics = True
    run.model.eval()
    with torch.no_grad():
        run.module(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    run.model.train()
    rows = []
    for layer in layers:
        stats = default_vector_stats(layer.default_vectors)
        stats["layer"] = layer.layer_number
        stats["term_norm_ratio"] = float(layer.last_term_norm_ratio)
        layer.track_metrics = False
        rows.append(stats)
    return rows


def report(args, runs, checkpoints, dv_stats, train_time, total_time, device, world):
    """Rank 0: the loss table, final losses, cosines, default-vector statistics, JSON and plots."""
    topk, dm = runs
    last = args.steps
    tail = max(1, min(args.eval_interval, args.steps))
    print("\nLoss (nats per byte; train = mean over the steps since the previous row):")
    print(loss_table(checkpoints, runs))
    print(f"\nFinal: valid loss TopK {topk.valid_loss[last]:.4f}, Default MoE {dm.valid_loss[last]:.4f} "
          f"({dm.valid_loss[last] - topk.valid_loss[last]:+.4f}); train loss (mean of last {tail} steps) "
          f"TopK {sum(topk.train_loss[-tail:]) / tail:.4f}, Default MoE {sum(dm.train_loss[-tail:]) / tail:.4f}")
    if not args.no_diagnostics:
        print("\nRouter gradient vs the dense one (that layer runs all experts on every token), cosine "
              "similarity on one validation micro-batch per rank (paper Fig. 4).\nT:topk = TopK model; "
              "D:topk = Default MoE model with TopK routing; D:dflt = Default MoE model's own gradient.")
        print(cosine_table(checkpoints, runs))
    print("\nDefault vectors after training (Default MoE model):")
    print(f"{'layer':>5} {'mean |E_i|':>10} {'min |E_i|':>10} {'max |E_i|':>10} "
          f"{'mean pairwise cos':>17} {'experts set':>11} {'|term|/|out|':>12}")
    for s in dv_stats:
        print(f"{s['layer']:>5} {s['mean_norm']:>10.4f} {s['min_norm']:>10.4f} {s['max_norm']:>10.4f} "
              f"{s['mean_pairwise_cosine']:>17.3f} {s['nonzero']:>8}/{s['experts']:<2} {s['term_norm_ratio']:>12.3f}")
    results = {
        "args": vars(args),
        "device": device.type,
        "world_size": world,
        "checkpoints": checkpoints,
        "train_loss": {r.name: r.train_loss for r in runs},
        "valid_loss": {r.name: [r.valid_loss[s] for s in checkpoints] for r in runs},
        "router_grad_cosines": {
            r.name: {str(s): {str(k): v for k, v in c.items()} for s, c in r.cosines.items()} for r in runs
        },
        "default_vectors": dv_stats,
        "train_seconds": train_time,
        "total_seconds": total_time,
    }
    with open(os.path.join(args.out, "cpu_demo_results.json"), "w") as f:
        json.dump(results, f, indent=1)
    written = ["cpu_demo_results.json"]
    if not args.no_plot:
        plot_losses(checkpoints, runs, os.path.join(args.out, "cpu_demo_loss.png"))
        written.append("cpu_demo_loss.png")
        if not args.no_diagnostics:
            from megatron_default_moe.analysis.diagnostics import plot_router_gradient_cosines

            path = os.path.join(args.out, "cpu_demo_router_grad_cosine.png")
            plot_router_gradient_cosines({r.name: r.cosines for r in runs}, path)
            written.append("cpu_demo_router_grad_cosine.png")
    print(f"\nWrote {', '.join(written)} to {args.out}/. Training {train_time:.0f} s, total {total_time:.0f} s.")


def quiet():
    """Keep the console to the demo's own output (import notices, deprecations)."""
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("torch.utils.cpp_extension", "megatron", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main():
    args = parse_args()
    relaunch_under_torchrun(args)
    quiet()
    t_start = time.time()
    device = setup_parallel(args)
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    os.makedirs(args.out, exist_ok=True)
    train, valid = load_data(args, device)
    runs = [Run("TopK", args, default_moe=False), Run("Default MoE", args, default_moe=True)]
    # Same seed, same weights; copy them to be certain (the default vectors exist only in one).
    state = runs[0].module.state_dict()
    state.update({k: v for k, v in runs[1].module.state_dict().items() if k.endswith("default_vectors")})
    runs[1].module.load_state_dict(state)

    from megatron.core import parallel_state

    world = torch.distributed.get_world_size()
    per_step = args.micro_batch * args.micro_batches * parallel_state.get_data_parallel_world_size()
    log(f"Megatron-Core GPTModel MoE: {args.layers} layers (first dense: {bool(args.first_layer_dense)}), "
        f"hidden {args.hidden}, {args.experts} experts top-{args.topk}, router {args.router}, "
        f"{sum(p.numel() for p in runs[0].module.parameters())} parameters on rank 0; "
        f"{world} ranks, EP={args.ep}, {device.type}; {per_step} x {args.seq_len} byte tokens per step; "
        f"Default MoE: beta={args.moe_default_ema_beta}, update={args.moe_default_update}, "
        f"weighting={args.moe_default_ema_weighting}, mode={args.moe_default_mode}")

    valid_batches = micro_batches(valid, 0, args.eval_iters, args, device)
    checkpoints = [s for s in range(0, args.steps + 1, args.eval_interval)]
    if checkpoints[-1] != args.steps:
        checkpoints.append(args.steps)

    def checkpoint(step):
        for run in runs:
            run.valid_loss[step] = run.evaluate(valid_batches)
            if not args.no_diagnostics:
                run.cosines[step] = measure_cosines(run, valid_batches[0])

    checkpoint(0)
    bar = progress(range(1, args.steps + 1), args.steps)
    t_train = time.time()
    for step in bar:
        batches = micro_batches(train, (step - 1) * per_step, args.micro_batches, args, device)
        losses = [run.train_step(batches) for run in runs]
        if is_rank0():
            bar.set_postfix_str(f"TopK {losses[0]:.3f}  Default {losses[1]:.3f}")
        if step in checkpoints:
            checkpoint(step)
            if is_rank0():
                bar.write(f"step {step:>4}: valid TopK {runs[0].valid_loss[step]:.4f}  "
                          f"Default MoE {runs[1].valid_loss[step]:.4f}")
    train_time = time.time() - t_train

    dv_stats = default_vector_report(runs[1], valid_batches[0])
    if is_rank0():
        report(args, runs, checkpoints, dv_stats, train_time, time.time() - t_start, device, world)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
