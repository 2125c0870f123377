#!/usr/bin/env python
"""What one Default MoE layer costs over stock TopK on a GPU, counted without one (issue 11).

    python examples/benchmark_cost.py                                # the three shapes, H100 figures
    python examples/benchmark_cost.py --shapes qwen3-30b-a3b --gpu h200 --json out/cost.json
    python examples/benchmark_cost.py --shapes custom --hidden 512 --experts 16 --ffn 1024 --topk 2

A CPU cannot time what a GPU pays: there the expert matmuls dwarf every extra memory pass, on an H100
(about 300 FLOP per byte of HBM) they do not. So this script counts instead. Method:

1. Build Megatron's ``MoELayer`` (TopK) and ``DefaultMoELayer`` with identical weights, bf16 (the
   default vectors stay fp32, as the layer keeps them), local spec (``SequentialMLP`` experts), one
   process, and run one forward + backward of the same tokens under a ``TorchDispatchMode`` that
   records every aten op: bytes read (its input tensors: unique elements of each, so a broadcast
   read counts once) and written (outputs; in-place ops write their mutated argument, ``index_copy_`` /
   ``index_add_`` only its indexed rows: the source's size; ``index_select`` reads the rows it
   gathers, its output's size, not its whole source; ``probe_exclude`` / ``probe_zero`` the
   candidate rows they read and zero (and, with ``--fit shared-1``, read of the expert input, as
   ``probe_coordinates``),
   ``probe_draw`` the rows of its strata's tokens, ``probe_add`` those of the weights), matmul FLOPs
   (``2 M N K`` for mm / addmm / bmm / baddbmm / mv / dot / _grouped_mm, and ``default_weights_backward``'s
   ``dL/dy @ tableᵀ``; where its table is too large for the kernel at the target shape, a GEMM of
   its own: ``split_term``), and one kernel per call.
   View and metadata ops (``FREE_OPS`` and every op whose schema says it is a view) cost 0 bytes
   and 0 kernels; allocations (``empty*``) cost no kernel. Elementwise FLOPs are left out (those
   ops are memory-bound). Ops that make a GPU wait for the host (``nonzero``, ``.item()``, boolean
   indexing, ``repeat_interleave`` without ``output_size``) are flagged as syncs.
2. Each op is attributed to the code that issued it: the innermost frame outside ``torch`` (for
   backward ops, the forward stack autograd's anomaly mode keeps on each node). Ops from
   ``megatron_default_moe`` are *ours*; the Default - TopK difference of the totals must equal
   them (printed as a cross-check).
3. Experts: on a GPU one runs grouped GEMMs (Transformer Engine), not a loop over experts, so ops
   issued inside ``layer.experts`` (forward, and backward nodes of its autograd graph) count one
   kernel per op per pass over all experts (``ceil(calls / local experts)``), with the same bytes
   and FLOPs. ``--experts-impl sequential`` counts the loop as it ran. Either way the experts are
   identical in TopK and Default, so the *extra* does not depend on this choice; the ratio does.
4. Extrapolation: measured at ``T`` and ``2 T`` tokens; per op (matched by phase, code path and
   occurrence) every figure is fitted as ``a + b T`` (weights do not scale, activations do) and
   evaluated at ``--target-tokens`` (16,384 per micro-batch). Where the real expert count does not
   fit in CPU memory (DeepSeek-V3: 256 experts x 88 MB of bf16 weights), it is also measured at
   two smaller counts ``E`` and fitted as ``a + b T + c E + d T E``: exact, because every tensor
   of the layer is sized by tokens, experts, or tokens x experts (router ``[E, H]``, logits
   ``[T, E]``, per-expert weights, the ``[E, H+1]`` statistics), and rows ``T K`` do not depend on E.
5. Expert parallelism: the figures are per GPU at ``EP`` (``--ep``): ``E / EP`` local experts and,
   balanced, the same ``T K`` rows. The experts' region scales as in 3/4; Default's statistics are
   handed the rows grouped into ``E / EP`` experts (``count_as_ep_rank``), so their weight matrix
   is the ``[E/EP + 1, 2, rows]`` one such a rank builds.
6. Roofline per op: ``max(bytes / HBM bandwidth, FLOPs / bf16 dense peak) + launch`` per kernel,
   on ``--gpu`` figures (printed). ``default_moe::expert_stats`` instead gets a model of its Triton
   kernels' parallelism (``stats_kernel_model``): their programs, with the rows each reads at the
   target (balanced over the local experts, or ``--hot-expert`` of them in one), are dispatched in
   grid order to the earliest free of the GPU's SMs, each reading at ``1 / SMs`` of the HBM
   bandwidth; its time is the makespan (waves, a serialised hot expert, too few programs). Peak memory: live bytes of the storages the step allocated
   (activations, saved tensors, gradients), tracked by the same mode, plus the layer's parameters,
   buffers and input, like ``torch.cuda.max_memory_allocated``.

On a GPU (``torch.cuda.is_available()``) the script also measures both layers: CUDA-event time of
forward + backward (warmup, median of ``--iters``) and ``torch.cuda.max_memory_allocated``, at
``--target-tokens`` and the real expert count (when it fits in the GPU's memory).
Not modelled: the statistics all-reduce of a multi-rank stage (see ``benchmark_scale.py``), the
dispatcher's all-to-all, kernel fusion a compiler might do.
"""

import argparse
import collections
import functools
import gc
import json
import math
import os
import platform
import statistics
import sys
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

GPUS = {  # HBM bytes/s, bf16 dense FLOP/s, seconds per kernel launch, SMs
    "h100": dict(name="H100 SXM", hbm_bw=3.35e12, bf16_flops=989e12, launch_s=4e-6, sms=132),
    "h200": dict(name="H200 SXM", hbm_bw=4.8e12, bf16_flops=989e12, launch_s=4e-6, sms=132),
    "b200": dict(name="B200", hbm_bw=8.0e12, bf16_flops=2250e12, launch_s=4e-6, sms=148),
}

# Router settings as the models ship them; ``validate`` may reject some (see ``router_note``).
SHAPES = {
    "paper-8c1": dict(hidden=1024, experts=8, ffn=2816, topk=1, glu=False, ep=1,
                      router=dict(moe_router_score_function="softmax", moe_router_pre_softmax=True,
                                  moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.01)),
    "qwen3-30b-a3b": dict(hidden=2048, experts=128, ffn=768, topk=8, glu=True, ep=8,
                          router=dict(moe_router_score_function="softmax", moe_router_pre_softmax=False,
                                      moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-3,
                                      moe_router_dtype="fp32")),
    "deepseek-v3": dict(hidden=7168, experts=256, ffn=2048, topk=8, glu=True, ep=64,
                        router=dict(moe_router_score_function="sigmoid", moe_router_pre_softmax=False,
                                    moe_router_enable_expert_bias=True, moe_router_num_groups=8,
                                    moe_router_group_topk=4, moe_router_topk_scaling_factor=2.5,
                                    moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=1e-4,
                                    moe_router_dtype="fp32")),
}  # fmt: skip
PAPER_ROUTER = dict(moe_router_score_function="softmax", moe_router_pre_softmax=True,
                    moe_router_enable_expert_bias=False, moe_router_topk_scaling_factor=None)  # fmt: skip

# Metadata-only ops (no kernel, no HBM traffic), besides every op whose schema is a view.
FREE_OPS = frozenset({
    "view", "_unsafe_view", "_reshape_alias", "reshape", "as_strided", "t", "transpose", "permute",
    "expand", "squeeze", "unsqueeze", "slice", "select", "split", "split_with_sizes", "chunk",
    "unbind", "narrow", "alias", "detach", "lift_fresh", "view_as", "diagonal", "unfold",
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_", "set_",
    "is_same_size", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "_version",
})  # fmt: skip
MATMULS = frozenset({"mm", "addmm", "bmm", "baddbmm", "mv", "addmv", "dot", "_grouped_mm"})
SYNC_OPS = frozenset({"nonzero", "_local_scalar_dense", "masked_select", "_unique2", "unique_consecutive",
                      "unique_dim", "is_nonzero", "equal"})  # fmt: skip
WRITE_ONLY = frozenset({"copy_", "fill_", "zero_", "normal_", "uniform_", "random_"})
# Their tensor arguments give only dtype, device or shape: nothing is read.
INDEXED_WRITES = frozenset({"index_copy_", "index_add_"})  # in place, touching the indexed rows only
READ_NOTHING = frozenset({"new_zeros", "new_ones", "new_full", "zeros_like", "ones_like", "full_like",
                          "rand_like", "randn_like", "randint_like"})
PACKAGE = "megatron_default_moe"
TORCH_DIR = os.path.dirname(torch.__file__)
STDLIB = os.path.dirname(os.__file__)


# -- counting ------------------------------------------------------------------------------------
def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a kernel touches in ``t``: its distinct elements (a stride-0 broadcast counts once)."""
    unique = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            unique *= size
    return (unique if t.numel() else 0) * t.element_size()


def _tensors(tree):
    out = []
    for x in tree if isinstance(tree, (list, tuple)) else [tree]:
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, (list, tuple)):
            out.extend(_tensors(x))
    return out


def matmul_flops(name, args, out) -> int:
    """``2 M N K`` of a matmul op from its output and contracted size (0 for other ops)."""
    if name not in MATMULS:
        return 0
    if name in ("addmm", "baddbmm", "addmv"):
        a = args[1]
    else:
        a = args[0]
    if name == "dot":
        return 2 * a.numel()
    return 2 * out.numel() * a.shape[-1]


def is_free(func) -> bool:
    name = func.overloadpacket.__name__
    return name in FREE_OPS or func.is_view


def is_sync(func, args, kwargs) -> bool:
    """Does this op make a GPU wait for the host (a data-dependent size or a scalar read)?"""
    name = func.overloadpacket.__name__
    if name in SYNC_OPS:
        return True
    if name == "repeat_interleave":
        return kwargs.get("output_size") is None
    if name in ("index", "index_put", "index_put_") and len(args) > 1:
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []))
    return False


@functools.cache
def package_dir():
    """Where the imported ``megatron_default_moe`` lives (an editable checkout or site-packages)."""
    import megatron_default_moe

    return os.path.dirname(os.path.abspath(megatron_default_moe.__file__))


def _skipped(filename):
    """torch, the stdlib and the CPU shim's device mapping own no op: look further out."""
    shim = os.path.join(package_dir(), "testing")
    return filename.startswith((TORCH_DIR, STDLIB, shim)) or filename.startswith("<")


def _owner(frames):
    """``file:line function`` of the innermost frame outside torch and the stdlib, and whether it
    is ours (``megatron_default_moe``, its CPU shim excepted)."""
    for filename, line, func in frames:
        if _skipped(filename):
            continue
        ours = filename.startswith(package_dir() + os.sep)
        short = os.path.relpath(filename, package_dir()) if ours else os.path.basename(filename)
        return ours, f"{short}:{line} {func}"
    return False, "?"


def _forward_frames(frame):
    frames = []
    while frame is not None:
        frames.append((frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name))
        frame = frame.f_back
    return frames


def _traceback_frames(node):
    """Frames of the forward stack anomaly mode saved on an autograd node, innermost first."""
    lines = node.metadata.get("traceback_", []) if node is not None else []
    frames = []
    for entry in reversed(lines):
        head = entry.strip().splitlines()[0] if entry.strip() else ""
        if head.startswith('File "'):
            filename, _, rest = head[6:].partition('", line ')
            line, _, func = rest.partition(", in ")
            frames.append((filename, int(line) if line.isdigit() else 0, func))
    return frames


def _fp32(x):
    return x.float() if isinstance(x, torch.Tensor) and x.dtype in (torch.bfloat16, torch.float16) else x


def run_op(func, args, kwargs):
    """Run one op for a count. A CPU without bf16 units runs a bf16 matmul about 100x slower than
    in fp32 (0.4 against 48 GFLOP/s on a core here: the DeepSeek-V3 count took hours), and a count
    needs the ops' shapes, not their last bits: CPU matmuls are computed from fp32 copies and cast
    back, and counted as the one bf16 kernel (bytes, FLOPs) they are on a GPU. So is CUDA's
    bf16 x bf16 -> fp32 ``mm.dtype``, which has no CPU kernel."""
    if func is torch.ops.aten.mm.dtype and args[0].device.type == "cpu":
        return torch.mm(args[0].float(), args[1].float())
    low = [t for t in _tensors(list(args)) if t.dtype in (torch.bfloat16, torch.float16)]
    if func.overloadpacket.__name__ not in MATMULS or not low or low[0].device.type != "cpu" or "out" in kwargs:
        return func(*args, **kwargs)
    return func(*[_fp32(a) for a in args], **{k: _fp32(v) for k, v in kwargs.items()}).to(low[0].dtype)


class Fp32CpuMatmuls(TorchDispatchMode):
    """The warm-up's matmuls as the count runs them (``run_op``), recording nothing."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return run_op(func, args, kwargs or {})


class CostMode(TorchDispatchMode):
    """Record every aten op of a forward + backward: name, phase, region, bytes, FLOPs, kernels."""

    def __init__(self):
        super().__init__()
        self.ops = []
        self.region = "layer"  # "experts" while inside the experts' forward
        self.expert_nodes = set()  # autograd nodes built by the experts' forward
        self.live = {}  # storage data_ptr -> (weak ref, bytes), storages allocated inside the mode
        self.live_bytes = 0
        self.peak_bytes = 0
        self.free_seen = set()

    def _sweep(self):
        """Forget storages that died since the last op (their bytes are free again)."""
        for ptr in [p for p, (ref, _) in self.live.items() if ref.expired()]:
            self.live_bytes -= self.live.pop(ptr)[1]

    def _track(self, outs):
        from torch.multiprocessing.reductions import StorageWeakRef

        self._sweep()
        for t in outs:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr and ptr not in self.live:
                self.live[ptr] = (StorageWeakRef(storage), storage.nbytes())
                self.live_bytes += storage.nbytes()
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = run_op(func, args, kwargs)
        name = func.overloadpacket.__name__
        node = torch._C._current_autograd_node()
        phase = "bwd" if node is not None else "fwd"
        region = ("experts" if node in self.expert_nodes else "layer") if node is not None else self.region
        outs = _tensors(out)
        self._track(outs)
        if is_free(func):
            self.free_seen.add(name)
            return out
        ours, where = _owner(_traceback_frames(node) if node is not None else _forward_frames(sys._getframe(1)))
        writes = [s.name for s in func._schema.arguments if s.alias_info is not None and s.alias_info.is_write]
        named = dict(zip((s.name for s in func._schema.arguments), args), **kwargs)
        mutated = _tensors([named[n] for n in writes if n in named])
        write_only = name in WRITE_ONLY or "out" in kwargs  # the destination is not read
        reads = [] if name in READ_NOTHING else [
            t for t in _tensors(list(named.values())) if not (write_only and any(t is m for m in mutated))]
        written = mutated + [t for t in outs if not any(t is m for m in mutated)]
        if name == "index_select":  # a gather reads the rows it selects (each time), not the whole source
            reads = [named["index"]] + outs
        rows = rows_in = 0  # bytes of the rows a probe op reads (and, but for the draw, writes) of its [T|R, *]
        # inputs; rows_in: the expert input's rows the exclusion reads for the shared-1 fit
        if name in ("probe_exclude", "probe_zero"):  # the candidate rows of the expert output / gradient only
            target = named["out_RH" if name == "probe_exclude" else "x_RH"]
            rows = tensor_bytes(target) * named["rows_B"].numel() // max(target.shape[0], 1)
            reads, written = [t for t in reads if t is not target], outs
            line_input = named.get("in_RH")  # shared-1: the candidate rows of the expert input, read only
            if line_input is not None:
                reads = [t for t in reads if t is not line_input]
                rows_in = tensor_bytes(line_input) * named["rows_B"].numel() // max(line_input.shape[0], 1)
        if name == "probe_coordinates":  # the candidate rows of the expert input, read only
            line_input = named["in_RH"]
            reads = [t for t in reads if t is not line_input]
            rows_in = tensor_bytes(line_input) * named["rows_B"].numel() // max(line_input.shape[0], 1)
        if name in ("probe_draw", "probe_add"):  # the strata's tokens' rows of the weights (or blocked pairs)
            # and, for the draw alone, of the routing map (probe_add reads and copies all of it)
            big = [named["weights_TE"]] + ([named["routing_map_TE"]] if name == "probe_draw" else [])
            reads = [t for t in reads if not any(t is b for b in big)]
            rows = sum(tensor_bytes(t) for t in big) * named["strata_B4"].shape[0] // max(big[0].shape[0], 1)
        flops = matmul_flops(name, args, outs[0]) if outs else 0
        table = named.get("table_KH") if name == "default_weights_backward" else None
        term = None
        if table is not None:  # the term's dL/dw = dL/dy @ tableᵀ inside the op: its FLOPs (the
            # GEMM route of a large table is decided at the target shape: ``split_term``)
            (T, E), (K, H) = named["logits_TE"].shape, table.shape
            flops, term = 2 * T * K * H, (K // E, H, named["grad"].element_size())
        if name in INDEXED_WRITES:  # only the indexed rows of the destination: the source's size
            source = named["source"]
            reads = [t for t in reads if t is not named["self"]] + ([source] if name == "index_add_" else [])
            written = [source]
        self.ops.append(dict(
            op=name, phase=phase, region=region, ours=ours, where=where,
            bytes_read=sum(tensor_bytes(t) for t in reads) + rows + rows_in,
            bytes_written=sum(tensor_bytes(t) for t in written) + (0 if name in ("probe_draw", "probe_add") else rows),
            flops=flops, kernels=1, sync=is_sync(func, args, kwargs), term=term,
        ))  # fmt: skip
        return out


def watch_experts(layer, mode: CostMode):
    """Hooks tagging the experts' forward ops, and the autograd nodes their backward runs in."""
    state = {}

    def pre(module, inputs):
        mode.region = "experts"
        seqs = [t.grad_fn._sequence_nr() for t in _tensors(inputs) if t.grad_fn is not None]
        state["after"] = max(seqs, default=-1)

    def post(module, inputs, outputs):
        mode.region = "layer"
        stack = [t.grad_fn for t in _tensors(outputs) if t.grad_fn is not None]
        while stack:
            node = stack.pop()
            if node is None or node in mode.expert_nodes:
                continue
            if type(node).__name__ != "AccumulateGrad" and node._sequence_nr() <= state["after"]:
                continue  # built before the experts ran: the router, the dispatcher, ...
            mode.expert_nodes.add(node)
            stack.extend(n for n, _ in node.next_functions)

    return [layer.experts.register_forward_pre_hook(pre), layer.experts.register_forward_hook(post)]


# -- building the layers --------------------------------------------------------------------------
def shape_spec(args, name):
    if name == "custom":
        spec = dict(hidden=args.hidden, experts=args.experts, ffn=args.ffn, topk=args.topk, glu=args.glu,
                    router=dict(moe_router_score_function="softmax", moe_router_pre_softmax=True,
                                moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.01))
        return spec
    return SHAPES[name]


def transformer_config(spec, experts, router_overrides=None):
    from megatron.core.transformer.transformer_config import TransformerConfig

    router = dict(spec["router"], **(router_overrides or {}))
    if not router.get("moe_router_num_groups"):
        router.pop("moe_router_group_topk", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformerConfig(
            num_layers=1, hidden_size=spec["hidden"], num_attention_heads=max(1, spec["hidden"] // 128),
            ffn_hidden_size=4 * spec["hidden"], num_moe_experts=experts, moe_ffn_hidden_size=spec["ffn"],
            moe_router_topk=spec["topk"], gated_linear_unit=spec["glu"],
            activation_func=torch.nn.functional.silu if spec["glu"] else torch.nn.functional.gelu,
            moe_token_dispatcher_type="alltoall", add_bias_linear=False, hidden_dropout=0.0,
            attention_dropout=0.0, bf16=True, params_dtype=torch.bfloat16,
            use_cpu_initialization=not torch.cuda.is_available(), bias_activation_fusion=False,
            gradient_accumulation_fusion=False, **router,
        )  # fmt: skip


def resolve_router(spec, experts):
    """The config to measure and a note: the shipped router if Default MoE accepts it, else the
    paper's (softmax, pre-softmax, no scaling or expert bias) for both TopK and Default."""
    from megatron_default_moe import DefaultMoEConfig

    config = transformer_config(spec, experts)
    try:
        DefaultMoEConfig().validate(config)
        return config, None
    except ValueError as err:
        note = (f"DefaultMoEConfig.validate rejects this model's router ({err}); measured BOTH TopK and "
                "Default with the paper's router instead (softmax, pre-softmax, no scaling factor or expert bias)")
        return transformer_config(spec, experts, PAPER_ROUTER), note


def build_layer(config, default_moe: bool, device, seed=1234, stats_stride=1, local_experts=None, probes=0,
                fit="constant"):  # fmt: skip
    """A stock ``MoELayer`` or a ``DefaultMoELayer``, same seed, so the same weights (checked)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_default_moe import DefaultMoEConfig, DefaultMoELayer

    subs = get_gpt_layer_local_spec(num_experts=config.num_moe_experts).submodules.mlp.keywords["submodules"]
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if default_moe:
            dm_config = DefaultMoEConfig(stats_stride=stats_stride, probes=probes, fit=fit)
            layer = DefaultMoELayer(config, subs, layer_number=1, dm_config=dm_config)
            if local_experts:
                count_as_ep_rank(layer, local_experts)
        else:
            layer = MoELayer(config, subs, layer_number=1)
    return layer.to(device=device, dtype=torch.bfloat16)


def count_as_ep_rank(layer, local_experts):
    """Hand the statistics this process's rows grouped into ``local_experts`` experts, as one rank
    of EP = E / local holds them: the same ``T K`` rows (balanced), ``local`` segments (the weight
    matrix is ``[local+1, 2, rows]``). Costs as on that rank; the vectors' values are not used."""
    on_output = layer.token_dispatcher.on_expert_output

    def regrouped(out_RH, probs_R, tokens_per_expert, in_RH=None):
        counts = tokens_per_expert.tolist() if torch.is_tensor(tokens_per_expert) else list(tokens_per_expert)
        group = len(counts) // local_experts
        return on_output(out_RH, probs_R, [sum(counts[i : i + group]) for i in range(0, len(counts), group)], in_RH)

    layer.token_dispatcher.on_expert_output = regrouped


def weights_fingerprint(layer):
    return [float(p.float().sum()) for _, p in zip(range(4), layer.parameters())]


def state_bytes(module):
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def tokens_for(hidden, tokens, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 1, hidden, generator=gen).to(device=device, dtype=torch.bfloat16)
    g = torch.randn(tokens, 1, hidden, generator=gen).to(device=device, dtype=torch.bfloat16)
    return x.requires_grad_(), g


def step(layer, x, g):
    layer.zero_grad(set_to_none=True)
    x.grad = None
    out, _ = layer(x)
    torch.autograd.backward(out, g)


def count_step(layer, x, g):
    """One recorded forward + backward (after one unrecorded warm-up); returns the ``CostMode``."""
    with Fp32CpuMatmuls():
        step(layer, x, g)
    layer.zero_grad(set_to_none=True)
    x.grad = None
    mode = CostMode()
    hooks = watch_experts(layer, mode)
    try:
        with torch.autograd.set_detect_anomaly(True, check_nan=False), mode:
            out, _ = layer(x)
            torch.autograd.backward(out, g)
    finally:
        for h in hooks:
            h.remove()
        mode.expert_nodes.clear()  # AccumulateGrad nodes hold the expert weights alive
    mode.base_bytes = state_bytes(layer) + tensor_bytes(x)
    return mode


# -- fitting ---------------------------------------------------------------------------------------
FIELDS = ("bytes_read", "bytes_written", "flops", "kernels", "syncs")


def keyed(mode: CostMode, local_experts: int, experts_impl: str):
    """Per-op records keyed for matching across runs: ``(phase, region, op, where, k)`` for the
    k-th such call outside the experts; one aggregate per ``(phase, op)`` inside them."""
    out, seen = {}, collections.Counter()
    for r in mode.ops:
        if r["region"] == "experts":
            key = (r["phase"], "experts", r["op"], "SequentialMLP", 0)
        else:
            base = (r["phase"], r["region"], r["op"], r["where"])
            key = base + (seen[base],)
            seen[base] += 1
        acc = out.setdefault(key, dict(dict.fromkeys(FIELDS, 0), calls=0, ours=r["ours"]))
        for f in ("bytes_read", "bytes_written", "flops", "kernels"):
            acc[f] += r[f]
        acc["syncs"] += int(r["sync"])
        acc["calls"] += 1
        acc["term"] = r["term"]
    for key, acc in out.items():
        if key[1] == "experts" and experts_impl == "grouped":
            acc["kernels"] = math.ceil(acc["calls"] / local_experts)
    return out


def fit(points, target, local_experts=None, experts_impl="grouped"):
    """Per-key fit of every field over measured points ``[((T, E), keyed)]``, evaluated at ``target``
    ``(T, E)``: ``a + b T`` (one E) or ``a + b T + c E + d T E`` (two E). Keys of the experts'
    region are evaluated at ``local_experts`` (E / EP) instead: with one measured E their
    token-independent part (weights, weight gradients; the loop's kernels) scales by
    ``local_experts / E``, their rows (``T K`` per GPU, balanced) do not."""
    keys = set().union(*(k for _, k in points))
    ts = sorted({p[0] for p, _ in points})
    es = sorted({p[1] for p, _ in points})
    T, E = target
    local = E if local_experts is None else local_experts
    mismatched = sum(1 for key in keys if any(key not in k for _, k in points))
    result = {}
    for key in keys:
        val = {}
        for f in FIELDS:
            v = {p: k.get(key, {}).get(f, 0) for p, k in points}
            # counts do not grow with tokens: take them at the largest T (fit only in E)
            f_ts = ts[-1:] if f in ("kernels", "syncs") else ts
            if key[1] != "experts" or local == E:
                val[f] = bilinear(v, f_ts, es, T, E)
            elif len(es) > 1:
                val[f] = bilinear(v, f_ts, es, T, local)
            else:
                a, at_t = bilinear(v, f_ts, es, 0, es[0]), bilinear(v, f_ts, es, T, es[0])
                scale = local / es[0] if (f != "kernels" or experts_impl == "sequential") else 1.0
                val[f] = a * scale + (at_t - a)
            val[f] = max(0.0, val[f])  # an op seen at one size only must not go negative
        if key[1] != "experts":  # one call per key: counts stay integral
            val["kernels"] = round(val["kernels"])
        val["ours"] = next(k[key]["ours"] for _, k in points if key in k)
        result[key] = val
        term = next(k[key].get("term") for _, k in points if key in k)
        if term is not None:
            result.update(split_term(key, val, term, T, E))
    return result, mismatched


def split_term(key, val, term, T, E):
    """``default_weights_backward`` with the term's table, at the target ``(T, E)``: one kernel
    (as counted) where ``ops.launch.table_in_kernel`` takes it, else two, as on CUDA: a GEMM
    (``dL/dy``, the table, ``[T, K]`` written; the FLOPs) and the kernel (the rest, ``[T, K]`` read)."""
    from megatron_default_moe.ops.launch import table_in_kernel

    lines, H, size = term
    K = lines * E
    if table_in_kernel(E, K):
        return {}
    out = T * K * (2 if size == 2 else 4)  # bf16 in bf16 training, else fp32 (``mm_fp32``)
    inputs = (T + K) * H * size
    gemm = dict(val, bytes_read=inputs, bytes_written=out, kernels=1)
    val.update(bytes_read=max(0.0, val["bytes_read"] - inputs) + out, flops=0)
    return {key[:2] + ("mm", key[3] + " (its GEMM)") + key[4:]: gemm}


def bilinear(v, ts, es, T, E):
    """Evaluate the exact fit through the measured values ``v[(t, e)]`` at ``(T, E)``."""
    def in_t(e):
        if len(ts) == 1:
            return v[(ts[0], e)]
        t1, t2 = ts
        b = (v[(t2, e)] - v[(t1, e)]) / (t2 - t1)
        return v[(t1, e)] + b * (T - t1)

    if len(es) == 1:
        return in_t(es[0])
    e1, e2 = es
    y1, y2 = in_t(e1), in_t(e2)
    return y1 + (y2 - y1) / (e2 - e1) * (E - e1)


def op_time(rec, gpu):
    """Roofline seconds of one fitted key: memory or compute bound, plus a launch per kernel (a
    modelled kernel: its makespan instead of the roofline)."""
    if "kernel_s" in rec:
        return rec["kernel_s"] + rec["kernels"] * gpu["launch_s"]
    mem = (rec["bytes_read"] + rec["bytes_written"]) / gpu["hbm_bw"]
    return max(mem, rec["flops"] / gpu["bf16_flops"]) + rec["kernels"] * gpu["launch_s"]


def totals(fitted, gpu):
    t = dict.fromkeys(("bytes", "flops", "kernels", "syncs", "time_s"), 0.0)
    for rec in fitted.values():
        t["bytes"] += rec["bytes_read"] + rec["bytes_written"]
        t["flops"] += rec["flops"]
        t["kernels"] += rec["kernels"]
        t["syncs"] += rec["syncs"]
        t["time_s"] += op_time(rec, gpu)
    t["kernels"] = round(t["kernels"])
    t["syncs"] = round(t["syncs"])
    return t


def _grouped(fitted, gpu, keep):
    groups = {}
    for key, rec in fitted.items():
        if keep(rec):
            g = groups.setdefault((key[0], key[2], key[3]), dict(time_s=0.0, bytes=0.0, kernels=0, syncs=0))
            g["time_s"] += op_time(rec, gpu)
            g["bytes"] += rec["bytes_read"] + rec["bytes_written"]
            g["kernels"] += rec["kernels"]
            g["syncs"] += rec["syncs"]
    return groups


def extra_ops(fit_topk, fit_default, gpu):
    """What Default adds, by (phase, op, where): every op our package issued, plus the residual
    difference of everything else (e.g. autograd adding the two gradients of the router logits),
    sorted by roofline time."""
    rows = [dict(phase=p, op=o, where=w, ours=True, **g)
            for (p, o, w), g in _grouped(fit_default, gpu, lambda r: r["ours"]).items()]
    theirs = [_grouped(f, gpu, lambda r: not r["ours"]) for f in (fit_default, fit_topk)]
    for key in set(theirs[0]) | set(theirs[1]):
        d, k = (t.get(key, dict(time_s=0.0, bytes=0.0, kernels=0, syncs=0)) for t in theirs)
        diff = {f: d[f] - k[f] for f in d}
        if diff["kernels"] or abs(diff["bytes"]) > 0.5:
            rows.append(dict(phase=key[0], op=key[1], where=key[2], ours=False, **diff))
    rows.sort(key=lambda r: -r["time_s"])
    return rows


def makespan(program_bytes, gpu):
    """Seconds until the last program ends: programs in grid order, each to the earliest free SM,
    each SM reading at ``1 / SMs`` of the HBM bandwidth."""
    import heapq

    share = gpu["hbm_bw"] / gpu["sms"]
    free = [0.0] * gpu["sms"]
    for b in program_bytes:
        heapq.heappush(free, heapq.heappop(free) + b / share)
    return max(free)


def stats_kernel_model(rows_L, hidden, num_experts, gpu, design="chunked", elem=2):
    """``(seconds, kernels, scratch bytes, programs)`` of ``expert_stats`` on ``gpu`` for sampled rows
    ``rows_L`` per local expert (``elem``-byte rows, fp32 probs). ``chunked`` (``triton_launch``):
    stage 1 one program per (``chunk``-row segment, 128-column block) over the host-known bound of
    segments, stage 2 one per (local expert, 32 columns of ``H+1``) summing its segments' fp32 partial rows
    and zeroing ``(E - L) / L`` other rows. ``per-expert`` (the earlier kernel): one program per
    (expert of all ``E``, 128 columns), each over every row of its expert."""
    from megatron_default_moe.ops.launch import STATS_BLOCK_H, STATS_REDUCE_BLOCK_H, stats_chunk

    blocks = [min(STATS_BLOCK_H, hidden - h) for h in range(0, hidden, STATS_BLOCK_H)]
    blocks1 = [min(STATS_REDUCE_BLOCK_H, hidden + 1 - h) for h in range(0, hidden + 1, STATS_REDUCE_BLOCK_H)]
    local, cols = len(rows_L), sum(rows_L)
    if design == "per-expert":
        rows_E = list(rows_L) + [0] * (num_experts - local)
        progs = [n * (b * elem + 4) + b * 4 for b in blocks for n in rows_E]  # blockIdx.x (expert) fastest
        return makespan(progs, gpu), 1, 0, len(progs)
    chunk = stats_chunk(cols, hidden)
    seg_rows = [min(chunk, n - k) for n in rows_L for k in range(0, n, chunk)]
    bound = -(-cols // chunk) + local
    stage1 = [(seg_rows[s] * (b * elem + 4) + b * 4 if s < len(seg_rows) else 0) for b in blocks for s in range(bound)]
    segs_L = [-(-n // chunk) for n in rows_L]
    others = -(-(num_experts - local) // local)
    stage2 = [(segs_L[l] + 1 + others) * b * 4 for b in blocks1 for l in range(local)]
    scratch = 2 * len(seg_rows) * (hidden + 1) * 4  # partial rows written, then read
    return makespan(stage1, gpu) + makespan(stage2, gpu), 2, scratch, len(stage1) + len(stage2)


def target_stats_rows(args, spec, local, stride):
    """Sampled rows per local expert at the target: ``T K`` rows on this GPU, every ``stride``-th,
    balanced over the local experts, or ``--hot-expert`` of them in the first."""
    cols = -(-args.target_tokens * spec["topk"] // stride)
    if args.hot_expert <= 0 or local == 1:
        return [cols // local + (l < cols % local) for l in range(local)]
    hot = round(args.hot_expert * cols)
    rest, others = cols - hot, local - 1
    return [hot] + [rest // others + (l < rest % others) for l in range(others)]


def model_stats_kernel(fitted, args, spec, local, stride, gpu, design=None):
    """Replace the roofline of the fitted ``expert_stats`` op by the kernel model at the target."""
    design = design or args.stats_kernel
    rows_L = target_stats_rows(args, spec, local, stride)
    seconds, kernels, scratch, programs = stats_kernel_model(rows_L, spec["hidden"], spec["experts"], gpu, design)
    for key, rec in fitted.items():
        if key[2] == "expert_stats":
            rec.update(kernel_s=seconds, kernels=kernels, programs=programs, rows_per_local_expert=rows_L)
            rec["bytes_read"] += scratch / 2
            rec["bytes_written"] += scratch / 2
    return dict(kernel_s=seconds, kernels=kernels, programs=programs, max_rows=max(rows_L), sampled_rows=sum(rows_L),
                roofline_s=sum(rows_L) * spec["hidden"] * 2 / gpu["hbm_bw"], design=design)  # fmt: skip


def expert_weight_bytes(spec):
    """bf16 bytes of one expert's weights (fc1 doubled for SwiGLU, fc2)."""
    return (3 if spec["glu"] else 2) * spec["hidden"] * spec["ffn"] * 2


def reduced_experts(spec):
    """The two smallest expert counts the router accepts: whole groups, and enough experts per
    group for ``topk / group_topk`` picks in each chosen group."""
    router, topk = spec["router"], spec["topk"]
    groups = router.get("moe_router_num_groups") or 1
    per_group = math.ceil(topk / (router.get("moe_router_group_topk") or 1)) if groups > 1 else 2 * topk
    low = groups * max(2, per_group)
    return [low, low + groups * max(1, per_group // 2)]


# -- one shape -------------------------------------------------------------------------------------
def measure_points(spec, args, device, local):
    """Counted runs of both layers at (T, E) points; E reduced where the weights would not fit.
    Default's statistics see ``local`` experts (``count_as_ep_rank``)."""
    E = spec["experts"]
    per_expert = expert_weight_bytes(spec)
    if E * per_expert * 2 <= args.max_expert_gb * 2**30:  # weights + their gradients
        es = [E]
    else:
        es = reduced_experts(spec)
    tokens = tokens_of(args, args.probe_budget)
    ts = [tokens, 2 * tokens]
    variants = ["topk"] + [f"default:{stride}" for stride in args.stats_strides]  # TopK once for every stride
    notes, points = [], {v: [] for v in variants}
    peaks = {v: {} for v in variants}
    base = {}
    for e in es:
        config, note = resolve_router(spec, e)
        if note and note not in notes:
            notes.append(note)
        for variant in variants:
            default, _, stride = variant.partition(":")
            layer = build_layer(config, default == "default", device, stats_stride=int(stride or 1),
                                local_experts=local, probes=args.probe_budget, fit=args.shape_fit)
            base.setdefault(variant, {})[e] = state_bytes(layer)
            if variant == "topk":
                fingerprint = weights_fingerprint(layer)
            elif weights_fingerprint(layer) != fingerprint:
                raise RuntimeError("TopK and Default layers got different weights")
            for t in ts:
                x, g = tokens_for(spec["hidden"], t, device)
                if getattr(layer, "probes", None) is not None:
                    set_probe_budget(layer, args.probe_budget * t // args.target_tokens)
                mode = count_step(layer, x, g)
                points[variant].append(((t, e), keyed(mode, e, args.experts_impl)))
                peaks[variant][(t, e)] = mode.peak_bytes + mode.base_bytes
                free_seen.update(mode.free_seen)
            del layer
            gc.collect()  # the statistics hook makes a cycle through the layer: free its weights now
    if len(es) > 1:
        notes.append(f"{E} experts do not fit in CPU memory at {per_expert * 2 / 2**20:.0f} MiB per expert "
                     f"(weights + gradients): measured at {es} experts and fitted a + bT + cE + dTE "
                     f"(exact: every tensor is sized by T, E or T x E), evaluated at {E}")
    return points, peaks, base, es, ts, notes


free_seen = set()


def ep_of(args, name, spec):
    """Expert-parallel size of the per-GPU figures: ``--ep``, else the shape's usual one."""
    ep = args.ep if args.ep is not None else spec.get("ep", 1)
    if spec["experts"] % ep:
        raise SystemExit(f"--ep {ep} must divide {spec['experts']} experts")
    return ep


def probes_and_fit_of(args, spec, ep):
    """``(probes per GPU and micro-batch, fit)``: as given, or where left at ``default`` what the
    package resolves for the config measured (``DefaultMoEConfig.resolved_probes`` /
    ``resolved_fit``: renormalised and sigmoid routers probe by the rule and fit ``shared-1``, off
    where probes cannot run, e.g. at a stride other than 1)."""
    from megatron_default_moe import DefaultMoEConfig

    config, _ = resolve_router(spec, spec["experts"])
    package = DefaultMoEConfig(stats_stride=max(args.stats_strides))
    probes = args.probes
    if probes == "default":
        probes = str(package.resolved_probes(config, token_sets=ep * args.dp)[0])
    budget = probe_budget_of(args, spec, ep, probes)
    fit = package.resolved_fit(config, budget > 0) if args.fit == "default" else args.fit
    if fit == "shared-1" and not budget:
        raise SystemExit("--fit shared-1 fits the probes' statistics: give --probes (the paper's pre-softmax "
                         "router, or a stats stride, has none by default)")
    return budget, fit


def probe_budget_of(args, spec, ep, probes):
    """Probes per GPU and micro-batch: ``--probes N``, or the rule of ``--moe-default-probes auto``:
    ``8 E / (EP · DP)`` (the statistics are summed over the stage, so each expert gets about 8
    samples a micro-batch)."""
    if probes in ("rule", "auto"):
        from megatron_default_moe.estimators.probes import auto_probe_budget

        budget = auto_probe_budget(spec["experts"], ep * args.dp)
    else:
        budget = int(probes)
    tokens = tokens_of(args, budget)
    if budget and (budget * tokens % args.target_tokens or budget * tokens < args.target_tokens):
        raise SystemExit(f"--probes {budget} at --target-tokens {args.target_tokens}: measured at --tokens "
                         f"{tokens}, the budget scales to {budget * tokens / args.target_tokens:g} probes; "
                         "it must be a whole number >= 1 (pick a budget that is a multiple of target / tokens)")
    return budget


def tokens_of(args, budget):
    """``T`` of the counts: ``--tokens``, or 256, raised where the probe budget would scale below one
    probe (``target / budget`` tokens: DeepSeek-V3's 32 per GPU are counted at 512 and 1024)."""
    if args.tokens:
        return args.tokens
    return max(256, args.target_tokens // budget) if budget else 256


def set_probe_budget(layer, budget):
    """Probes in proportion to the measured tokens (``B · T / target``): the rows a GPU receives
    scale like its routed rows, so the ``a + bT`` fit carries them to the target at any EP (one
    stratum of ``target / B`` tokens per probe, this GPU's tokens alone)."""
    layer.probes.budget = layer.probes.stage_budget = budget  # max_rows follows per shape (``strata``)
    layer.probes.token_sets = 1


def probe_traffic(spec, budget, tokens):
    """What ``budget`` probe rows add to the dispatcher, balanced: the all-to-all carries ``T K``
    rows of ``H`` bf16 values each way (dispatch, combine; again in the backward), probes add
    ``B`` rows each way; in rows, also the experts' GEMMs."""
    routed_rows = tokens * spec["topk"]
    row_bytes = spec["hidden"] * 2
    return dict(probes=budget, routed_rows=routed_rows, extra_row_fraction=budget / routed_rows,
                a2a_bytes_topk=4 * routed_rows * row_bytes, a2a_bytes_extra=4 * budget * row_bytes)


def run_shape(name, args, device, gpu):
    """One result per ``--stats-stride`` (TopK counted once for all)."""
    spec = shape_spec(args, name)
    ep = ep_of(args, name, spec)
    local = spec["experts"] // ep
    args.probe_budget, args.shape_fit = probes_and_fit_of(args, spec, ep)
    points, peaks, base, es, ts, shape_notes = measure_points(spec, args, device, local)
    target = (args.target_tokens, spec["experts"])
    results = []
    for stride in args.stats_strides:
        variants = dict(topk="topk", default=f"default:{stride}")
        fitted, tot, mism = {}, {}, {}
        for variant, measured in variants.items():
            fitted[variant], mism[variant] = fit(points[measured], target, local, args.experts_impl)
            if variant == "default":
                ratios = {}  # Default / TopK time under each kernel design (the other one: for comparison)
                for design in ("per-expert", "chunked"):
                    alt = {k_: dict(rec) for k_, rec in fitted[variant].items()}
                    model_stats_kernel(alt, args, spec, local, stride, gpu, design)
                    ratios[design] = totals(alt, gpu)["time_s"] / totals(fitted["topk"], gpu)["time_s"]
                kernel = model_stats_kernel(fitted[variant], args, spec, local, stride, gpu)
                kernel["ratio_time_by_design"] = ratios
            tot[variant] = totals(fitted[variant], gpu)
            # EP: drop the weights and gradients of the experts this GPU does not hold
            remote = (spec["experts"] - local) * expert_weight_bytes(spec) * 2
            tot[variant]["peak_bytes"] = bilinear(peaks[measured], ts, es, *target) - remote
        results.append(_result(name, spec, args, ep, local, stride, list(shape_notes), es, ts, fitted, tot, mism, gpu,
                               kernel))  # fmt: skip
    return results


def _region_flops(fitted, region="experts"):
    return sum(rec["flops"] for key, rec in fitted.items() if key[1] == region)


def _result(name, spec, args, ep, local, stride, notes, es, ts, fitted, tot, mism, gpu, kernel):
    if any(mism.values()):
        notes.append(f"ops seen at one measured size only (topk {mism['topk']}, default {mism['default']}): "
                     "counted at the largest size, bytes clamped at 0; raise --tokens if this matters")
    rows = extra_ops(fitted["topk"], fitted["default"], gpu)
    ours_total = {f: sum(r[f] for r in rows if r["ours"]) for f in ("time_s", "kernels", "bytes", "syncs")}
    k, d = tot["topk"], tot["default"]
    result = dict(
        shape=name, spec={k_: v for k_, v in spec.items()}, notes=notes, measured_tokens=ts, measured_experts=es,
        target_tokens=args.target_tokens, experts_impl=args.experts_impl, stats_stride=stride, ep=ep,
        local_experts=local, stats_kernel=kernel, topk=k, default=d,
        probe_traffic=probe_traffic(spec, args.probe_budget, args.target_tokens), fit=args.shape_fit,
        extra_flops_fraction=(d["flops"] - k["flops"]) / k["flops"],
        extra_expert_flops_fraction=_region_flops(fitted["default"]) / _region_flops(fitted["topk"]) - 1.0,
        ratio_time=d["time_s"] / k["time_s"], ratio_bytes=d["bytes"] / k["bytes"],
        extra_kernels=d["kernels"] - k["kernels"], extra_syncs=d["syncs"] - k["syncs"],
        extra_peak_bytes=d["peak_bytes"] - k["peak_bytes"],
        extra_peak_fraction=(d["peak_bytes"] - k["peak_bytes"]) / k["peak_bytes"],
        ours=ours_total, extra_ops=rows,
        ops={v: sorted((dict(phase=key[0], region=key[1], op=key[2], where=key[3], index=key[4],
                             time_s=op_time(rec, gpu), **rec) for key, rec in fitted[v].items()),
                       key=lambda o: -o["time_s"]) for v in fitted},
        unmatched_keys=mism,
    )  # fmt: skip
    return result


# -- measured on a GPU ---------------------------------------------------------------------------
def cuda_measure(name, args, device, stride):
    """CUDA-event median time of forward + backward and peak memory, TopK vs Default, at the target;
    with fewer experts where two layers' weights and gradients would not fit (halved on OOM)."""
    spec = shape_spec(args, name)
    groups = spec["router"].get("moe_router_num_groups") or 1
    free, _ = torch.cuda.mem_get_info()
    e = min(spec["experts"], int(0.35 * free / (4 * expert_weight_bytes(spec))) // groups * groups)
    while True:
        try:
            return _cuda_measure_at(spec, max(e, min(reduced_experts(spec)[0], spec["experts"])), args, device, stride)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if e <= reduced_experts(spec)[0]:
                return dict(error="CUDA out of memory at the smallest expert count")
            e = max(groups, e // 2 // groups * groups)
        except Exception as err:  # keep the counts of this shape and go on with the next
            import traceback

            return dict(error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-4000:])


def _cuda_measure_at(spec, e, args, device, stride):
    config, note = resolve_router(spec, e)
    out = dict(experts=e, tokens=args.target_tokens, note=note, iters=args.iters)
    layers = [build_layer(config, False, device), build_layer(config, True, device, stats_stride=stride,
                                                                  probes=args.probe_budget, fit=args.shape_fit)]
    x, g = tokens_for(spec["hidden"], args.target_tokens, device)
    times = [[], []]
    for it in range(args.warmup + args.iters):
        for j in (0, 1) if it % 2 == 0 else (1, 0):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(layers[j], x, g)
            end.record()
            torch.cuda.synchronize()
            if it >= args.warmup:
                times[j].append(start.elapsed_time(end) / 1e3)
    peaks = []
    for layer in layers:
        for other in layers:
            other.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step(layer, x, g)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated())
    ratios = sorted(b / a for a, b in zip(*times))
    out.update(topk_s=statistics.median(times[0]), default_s=statistics.median(times[1]),
               ratio_median_paired=statistics.median(ratios), peak_topk=peaks[0] - state_bytes(layers[1]),
               peak_default=peaks[1] - state_bytes(layers[0]),
               note_peak="max_memory_allocated over one step of each, minus the other layer's parameters")  # fmt: skip
    del layers
    torch.cuda.empty_cache()
    return out


# -- output ------------------------------------------------------------------------------------------
def fmt_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def print_shape(r, gpu, top):
    s = r["spec"]
    print(f"\n== {r['shape']}: hidden {s['hidden']}, {s['experts']} experts, FFN {s['ffn']}, top-{s['topk']}, "
          f"{'SwiGLU' if s['glu'] else 'GeLU'}; per GPU at EP={r['ep']} ({r['local_experts']} local experts, "
          f"{r['target_tokens']} tokens); measured at T={r['measured_tokens']}, E={r['measured_experts']}; "
          f"experts as {r['experts_impl']} kernels; Default with --moe-default-stats-stride {r['stats_stride']}"
          + (f", --moe-default-probes {r['probe_traffic']['probes']} --moe-default-fit {r['fit']}"
             if r["probe_traffic"]["probes"] else ""))
    for note in r["notes"]:
        print(f"   NOTE: {note}")
    print(f"   {'':9} {'HBM bytes':>11} {'GFLOP':>9} {'kernels':>8} {'syncs':>6} {'time µs':>9} {'peak mem':>11}")
    for v in ("topk", "default"):
        t = r[v]
        print(f"   {v:9} {fmt_bytes(t['bytes']):>11} {t['flops'] / 1e9:>9.1f} {t['kernels']:>8} {t['syncs']:>6} "
              f"{t['time_s'] * 1e6:>9.1f} {fmt_bytes(t['peak_bytes']):>11}")
    k = r["stats_kernel"]
    if not r["probe_traffic"]["probes"]:  # with probes the routed rows' statistics are not taken
        print(f"   expert_stats ({k['design']} kernel model): {k['programs']} programs on {gpu['sms']} SMs over "
              f"{k['sampled_rows']} sampled rows (at most {k['max_rows']} in one expert): {k['kernel_s'] * 1e6:.1f} µs "
              f"+ {k['kernels']} launches, against {k['roofline_s'] * 1e6:.1f} µs reading the rows at full bandwidth; "
              f"Default/TopK time by kernel design: "
              + ", ".join(f"{d} {v:.4f}" for d, v in k["ratio_time_by_design"].items()))
    o = r["ours"]
    print(f"   Default/TopK: time {r['ratio_time']:.4f} ({100 * (r['ratio_time'] - 1):+.1f}%), bytes "
          f"{r['ratio_bytes']:.4f} ({100 * (r['ratio_bytes'] - 1):+.1f}%); extra kernels {r['extra_kernels']}, "
          f"extra host syncs {r['extra_syncs']}; extra peak memory {fmt_bytes(r['extra_peak_bytes'])} "
          f"({100 * r['extra_peak_fraction']:+.2f}%)")
    p = r["probe_traffic"]
    if p["probes"]:
        print(f"   probes: {p['probes']} per GPU and micro-batch, +{100 * p['extra_row_fraction']:.3f}% expert rows; "
              f"the experts' FLOPs +{100 * r['extra_expert_flops_fraction']:.3f}% (counted, forward + backward; all "
              f"FLOPs +{100 * r['extra_flops_fraction']:.3f}%); all-to-all "
              f"{fmt_bytes(p['a2a_bytes_topk'])} + {fmt_bytes(p['a2a_bytes_extra'])} both ways, forward + backward "
              f"(not in the roofline: the dispatcher's all-to-all is not modelled)")
    print(f"   of which issued by {PACKAGE}: {o['kernels']} kernels, {fmt_bytes(o['bytes'])}, "
          f"{o['time_s'] * 1e6:.1f} µs of the {(r['default']['time_s'] - r['topk']['time_s']) * 1e6:.1f} µs extra")
    print(f"   top extra ops ({gpu['name']} roofline):")
    for row in r["extra_ops"][:top]:
        flags = ("  [host sync]" if row["syncs"] else "") + ("" if row["ours"] else "  [not issued by us]")
        print(f"     {row['time_s'] * 1e6:>8.1f} µs {row['kernels']:>4} k {fmt_bytes(row['bytes']):>11}  "
              f"{row['phase']} {row['op']:<22} {row['where']}{flags}")
    if "cuda" in r:
        c = r["cuda"]
        if "error" in c:
            print(f"   CUDA measured: {c['error']}")
            return
        print(f"   CUDA measured ({c['tokens']} tokens, {c['experts']} experts): TopK {c['topk_s'] * 1e3:.3f} ms, "
              f"Default {c['default_s'] * 1e3:.3f} ms, ratio {c['ratio_median_paired']:.4f}; peak "
              f"{fmt_bytes(c['peak_topk'])} vs {fmt_bytes(c['peak_default'])}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="paper-8c1,qwen3-30b-a3b,deepseek-v3",
                   help=f"comma list of {list(SHAPES) + ['custom']}")
    p.add_argument("--gpu", default="h100", choices=sorted(GPUS))
    p.add_argument("--hidden", type=int, default=1024, help="custom shape")
    p.add_argument("--experts", type=int, default=8, help="custom shape")
    p.add_argument("--ffn", type=int, default=2816, help="custom shape")
    p.add_argument("--topk", type=int, default=1, help="custom shape")
    p.add_argument("--glu", action="store_true", help="custom shape: SwiGLU experts")
    p.add_argument("--tokens", type=int, default=None,
                   help="T: counted at T and 2T tokens (default 256, or more where the probes need it)")
    p.add_argument("--target-tokens", type=int, default=16384, help="tokens per micro-batch to extrapolate to")
    p.add_argument("--max-expert-gb", type=float, default=3.0,
                   help="CPU budget for expert weights + gradients; above it, measure fewer experts and fit in E")
    p.add_argument("--ep", type=int, default=None,
                   help="expert-parallel size: per-GPU figures with E/EP local experts (default: per shape, "
                        "paper-8c1 1, qwen3 8, deepseek-v3 64; custom 1)")
    p.add_argument("--experts-impl", default="grouped", choices=("grouped", "sequential"))
    p.add_argument("--stats-stride", default="1",
                   help="Default MoE's --moe-default-stats-stride: statistics from every N-th expert-output row; "
                        "a comma list (1,2,4,8,16) reports each, TopK counted once")
    p.add_argument("--stats-kernel", default="chunked", choices=("chunked", "per-expert"),
                   help="expert_stats' kernel model: chunked (ops/launch.py) or per-expert (the earlier kernel: "
                        "one program per expert and 128 columns, over all its rows)")
    p.add_argument("--hot-expert", type=float, default=0.0,
                   help="share of the sampled rows in one local expert (0: balanced) for the kernel model")
    p.add_argument("--kernel-model-only", action="store_true",
                   help="print expert_stats' kernel model (both designs, balanced and 90%% hot) per shape and stride, "
                        "and measure nothing")
    p.add_argument("--fit", default="default", choices=("default", "constant", "shared-1"),
                   help="Default MoE's --moe-default-fit (shared-1 needs probes); default: the package's for the "
                        "shape's router (shared-1 for sigmoid routers with probes, else constant)")
    p.add_argument("--probes", default="default",
                   help="Default MoE's --moe-default-probes per GPU and micro-batch at --target-tokens: N, 'rule' "
                        "(8 E / (EP DP), as --moe-default-probes auto: about 8 samples per expert "
                        "and micro-batch over the stage), or 'default': the package's for the shape's router "
                        "(the rule for sigmoid routers at --stats-stride 1, else 0)")
    p.add_argument("--dp", type=int, default=1, help="data-parallel size of the stage, for --probes rule")
    p.add_argument("--top", type=int, default=8, help="top extra ops to print")
    p.add_argument("--iters", type=int, default=20, help="CUDA timing iterations")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-cuda-timing", action="store_true", help="on a GPU, count only")
    p.add_argument("--json", default=None, help="write every figure to this path")
    args = p.parse_args(argv)
    args.stats_strides = [int(v) for v in str(args.stats_stride).split(",")]
    if args.probes not in ("0", "default") and args.stats_strides != [1]:
        p.error("--stats-stride does not apply with --probes: the vectors then average the probe rows only")
    if args.fit == "shared-1" and args.probes == "0":
        p.error(f"--fit {args.fit} fits the probes' statistics: it needs --probes")
    return args


def setup():
    """One process, Megatron's groups of size 1: gloo + the CPU stand-ins, or NCCL on a GPU."""
    if "RANK" not in os.environ:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(sock.getsockname()[1])
    if not torch.cuda.is_available():
        from megatron_default_moe.testing import cpu

        cpu.init_parallel(seed=1234)
        return torch.device("cpu")
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.cuda.set_device(0)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(1234)
    return torch.device("cuda")


def source_state():
    """The commit measured and whether the package had uncommitted edits (they are measured too)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", PACKAGE], cwd=root, capture_output=True, text=True,
                               timeout=10).stdout.strip()  # fmt: skip
        return dict(commit=head or None, package_modified=bool(dirty))
    except (OSError, subprocess.SubprocessError):
        return dict(commit=None, package_modified=None)


def machine():
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} visible"


def print_kernel_model(args, gpu):
    """``expert_stats`` alone at the target, by design, balanced and with 90% of the rows in one expert."""
    print(f"expert_stats kernel model, {gpu['name']} ({gpu['sms']} SMs, {gpu['hbm_bw'] / 1e12:.2f} TB/s), "
          f"{args.target_tokens} tokens; µs without launches (programs)")
    print(f"{'shape':<15} {'stride':>6} {'full BW':>8} | {'per-expert':>17} {'90% hot':>8} | {'chunked':>17} {'90% hot':>8}")
    for name in args.shapes.split(","):
        spec = shape_spec(args, name)
        local = spec["experts"] // ep_of(args, name, spec)
        for stride in args.stats_strides:
            cells = []
            for design in ("per-expert", "chunked"):
                for hot in (0.0, 0.9):
                    rows_L = target_stats_rows(argparse.Namespace(**dict(vars(args), hot_expert=hot)), spec, local, stride)
                    cells.append(stats_kernel_model(rows_L, spec["hidden"], spec["experts"], gpu, design))
            full = sum(rows_L) * spec["hidden"] * 2 / gpu["hbm_bw"]
            print(f"{name:<15} {stride:>6} {full * 1e6:>8.1f} | {cells[0][0] * 1e6:>8.1f} ({cells[0][3]:>6}) "
                  f"{cells[1][0] * 1e6:>8.1f} | {cells[2][0] * 1e6:>8.1f} ({cells[2][3]:>6}) {cells[3][0] * 1e6:>8.1f}")


def main(argv=None):
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.kernel_model_only:
        return print_kernel_model(args, GPUS[args.gpu])
    device = setup()
    gpu = GPUS[args.gpu]
    print(f"machine: {machine()}; torch {torch.__version__}; counted on {device.type}, bf16")
    print(f"roofline: {gpu['name']}: HBM {gpu['hbm_bw'] / 1e12:.2f} TB/s, bf16 dense {gpu['bf16_flops'] / 1e12:.0f} "
          f"TFLOP/s, {gpu['launch_s'] * 1e6:.0f} µs per kernel launch, {gpu['sms']} SMs; time per op = "
          f"max(bytes/BW, FLOPs/peak) + launches (expert_stats: its kernels' makespan on the SMs + launches)")
    results = []
    report = dict(machine=machine(), source=source_state(), torch=torch.__version__, gpu=dict(gpu, key=args.gpu),
                  args=vars(args), free_ops=sorted(FREE_OPS), shapes=results)  # fmt: skip
    for name in args.shapes.split(","):
        for r in run_shape(name, args, device, gpu):
            if device.type == "cuda" and not args.no_cuda_timing:
                r["cuda"] = cuda_measure(name, args, device, r["stats_stride"])
                torch.cuda.empty_cache()
            results.append(r)
            print_shape(r, gpu, args.top)
        report["free_ops_seen"] = sorted(free_seen)
        write_json(args.json, report)  # after every shape: a run cut short keeps what it finished
    print(f"\nfree (view/metadata) ops seen, 0 bytes and 0 kernels: {', '.join(sorted(free_seen))}")
    if args.json:
        print(f"wrote {args.json}")
    return report


def write_json(path, report):
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    main()
