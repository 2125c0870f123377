"""Launches of the Triton kernels (``ops/kernels/ema.py``, ``ops/kernels/fit.py``; the probes'
are built in ``ops/probe_launch.py``): each op's launcher builds its ``Launch``es in one
function, which ``tests/test_triton_aot.py`` compiles for every GPU target, so the compiled
signatures are the launched ones.

The kernels assume row-major rows (row stride ``H``, ``H + 1``, column stride 1): read-only inputs
are made contiguous here (a no-op for Megatron's tensors), a buffer the op writes in place must
already be (``LayoutError`` otherwise: a copy would leave the caller's buffer unchanged).
"""

import torch
import triton

from megatron_default_moe.functional import mm_fp32
from megatron_default_moe.ops.fit import RIDGE as FIT_RIDGE
from megatron_default_moe.ops.kernels import ema as K
from megatron_default_moe.ops.kernels import fit as KF
from megatron_default_moe.ops.launching import INTERPRETER, Launch, LayoutError, in_place, run  # noqa: F401
from megatron_default_moe.ops.probe_launch import (
    probe_add_launches,
    probe_coordinates_launches,
    probe_draw_launches,
    probe_exclude_launches,
    probe_zero_launches,
)

BLOCK_H = 512  # 1-D passes over a row of H
STATS_BLOCK_R, STATS_BLOCK_H = 32, 128  # expert_stats stage 1: a [rows, H] tile per step
STATS_REDUCE_BLOCK_H = 32  # stage 2: columns per program (a hot expert's segments over many programs)
STATS_PROGRAMS = 1024  # stage 1's target grid: ~8 waves of 132 SMs, whatever the shape
STATS_MIN_CHUNK = 64  # rows per program at least: stage 2 reads 1 fp32 row per chunk of rows
SCORES = {"softmax": 0, "sigmoid": 1, "sqrtsoftplus": 2}


def stats_chunk(cols: int, hidden: int) -> int:
    """Sampled rows per stage-1 program: a power of two (>= ``STATS_MIN_CHUNK``) giving about
    ``STATS_PROGRAMS`` programs over ``cols`` rows and ``H / STATS_BLOCK_H`` column blocks."""
    want = triton.cdiv(cols * triton.cdiv(hidden, STATS_BLOCK_H), STATS_PROGRAMS)
    return max(STATS_MIN_CHUNK, triton.next_power_of_2(want))


def expert_stats_launches(out_CH, p_R, counts_L, offset, stride, first, num_experts, uniform, count_rows):
    """``(stats_EH1, launches)``. Stage 1: each expert's sampled rows split in ``chunk``-row
    segments, one program per (segment, column block); the grid is the host-known bound
    ``cdiv(C, chunk) + L`` (no sync), each program finds its expert from the device-side counts.
    Stage 2: per (local expert, column block) its segments summed in a fixed order."""
    cols, H = out_CH.shape
    L = counts_L.numel()
    if out_CH.stride(1) != 1:
        out_CH = out_CH.contiguous()
    p_R, counts_L = p_R.contiguous(), counts_L.to(torch.long).contiguous()
    dev = out_CH.device
    if L == 0:
        return torch.zeros(num_experts, H + 1, dtype=torch.float32, device=dev), []
    chunk = stats_chunk(cols, H)
    segments = triton.cdiv(cols, chunk) + L  # Σ_l ceil(n_l / chunk) <= C / chunk + L
    stats = torch.empty(num_experts, H + 1, dtype=torch.float32, device=dev)
    part = torch.empty(segments, H + 1, dtype=torch.float32, device=dev)
    block_l = max(2, triton.next_power_of_2(L))
    partial = Launch(K._stats_partial_kernel, (segments, triton.cdiv(H, STATS_BLOCK_H)),
                     (out_CH, out_CH.stride(0), p_R, counts_L, part, H, offset, stride, cols, L, chunk),
                     dict(UNIFORM=uniform, COUNT_ROWS=count_rows, BLOCK_L=block_l, BLOCK_H=STATS_BLOCK_H,
                          BLOCK_R=STATS_BLOCK_R))  # fmt: skip
    reduce = Launch(K._stats_reduce_kernel, (L, triton.cdiv(H + 1, STATS_REDUCE_BLOCK_H)),
                    (part, counts_L, stats, H, offset, stride, cols, L, chunk, first, num_experts),
                    dict(BLOCK_L=block_l, BLOCK_H=STATS_REDUCE_BLOCK_H))  # fmt: skip
    return stats, [partial, reduce]


def ema_update_launches(defaults_EH, stats_EH1, beta, skips_E, snapshot_dtype):
    E, H = defaults_EH.shape
    in_place("defaults_EH", defaults_EH)
    in_place("skips_E", skips_E)
    snapshot = torch.empty(E, H, dtype=snapshot_dtype, device=defaults_EH.device)
    updated = torch.empty(E, dtype=torch.bool, device=defaults_EH.device)
    args = (defaults_EH, stats_EH1.contiguous(), snapshot, updated, skips_E, H, 1.0 - beta)
    return (snapshot, updated), [Launch(K._ema_kernel, (E,), args, dict(BLOCK_H=BLOCK_H))]


def default_weights_launches(logits_TE, probs_TE, selected_TE, score_function, renormalise, all_experts, scale, eps,
                             dtype=None):  # fmt: skip
    T, E = logits_TE.shape
    w = torch.empty(T, E, dtype=dtype or torch.float32, device=logits_TE.device)
    args = (logits_TE.contiguous(), probs_TE.contiguous(), selected_TE.contiguous(), w, E, scale, eps)
    flags = dict(SCORE=SCORES[score_function], RENORM=renormalise, ALL=all_experts, BLOCK_E=triton.next_power_of_2(E))
    return w, [Launch(K._weights_fwd_kernel, (T,), args, flags)] if T else []


ACCUMULATORS = 16384  # fp32 [BLOCK_T, BLOCK_E] accumulators of the weights' backward: 64 registers a thread
WEIGHTS_BWD_WARPS = 8


def weights_backward_blocks(E: int, lines: int = 1):
    """``(BLOCK_E, BLOCK_T)`` of ``_weights_bwd_kernel``, with ``lines`` accumulators (2: ``[A; B]``)."""
    block_e = max(16, triton.next_power_of_2(E))  # a tl.dot tile is 16 wide at least
    return block_e, max(16, min(64, ACCUMULATORS // (block_e * lines)))


def table_in_kernel(E: int, K: int) -> bool:
    """Whether ``default_weights_backward`` forms ``dL/dw = dL/dy @ tableᵀ`` in its kernel: each
    block of tokens reads the whole ``[K, H]`` table (from L2), worth it while those reads stay
    within 4 x ``dL/dy``'s own (``K <= 4 BLOCK_T``: Qwen3-30B-A3B's ``[A; B]``, 256 x 2048).
    Past that (DeepSeek-V3's 512 x 7168) a GEMM writes ``[T, K]`` and the kernel reads it."""
    return K <= 4 * weights_backward_blocks(E, max(1, K // E))[1]


def default_weights_backward_launches(grad, logits_TE, probs_TE, selected_TE, score_function, renormalise,
                                      all_experts, scale, eps, base_TE=None, s_T1=None, x_TH=None, d_H=None,
                                      table_KH=None):  # fmt: skip
    """One program per block of tokens; with ``table_KH`` each forms its ``dL/dw`` from ``dL/dy``
    (a loop over ``H``), or a GEMM does it first for a large table; with ``x_TH`` its ``s = x · d``."""
    T, E = logits_TE.shape
    dz = torch.empty(T, E, dtype=logits_TE.dtype, device=logits_TE.device)
    g = grad.reshape(T, -1).contiguous()
    if table_KH is not None and not table_in_kernel(E, table_KH.shape[0]):
        table = table_KH.to(g.dtype)
        g, table_KH = g @ table.t() if g.dtype == torch.bfloat16 else mm_fp32(g, table.t()), None  # as the old term
    table = dz if table_KH is None else table_KH.to(g.dtype).contiguous()  # unread without TABLE
    base = dz if base_TE is None else base_TE.contiguous()
    s = dz if s_T1 is None else s_T1.float().contiguous()  # unread without HAS_S (or with X_DOT)
    x, d = (dz, dz) if x_TH is None else (x_TH.contiguous(), d_H.contiguous())  # unread without X_DOT
    line = s_T1 is not None or x_TH is not None
    block_e, block_t = weights_backward_blocks(E, 1 + line)
    args = (g, table, s, x, d, logits_TE.contiguous(), probs_TE.contiguous(), selected_TE.contiguous(), base, dz, T,
            E, g.shape[1] if table_KH is not None else x.shape[1], scale, eps)  # fmt: skip
    flags = dict(SCORE=SCORES[score_function], RENORM=renormalise, ALL=all_experts, HAS_BASE=base_TE is not None,
                 TABLE=table_KH is not None, HAS_S=line, X_DOT=x_TH is not None, IEEE=g.dtype == torch.float32,
                 WIDEN=INTERPRETER and g.dtype == torch.bfloat16, BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=64,
                 num_warps=WEIGHTS_BWD_WARPS)  # fmt: skip
    return dz, [Launch(K._weights_bwd_kernel, (triton.cdiv(T, block_t),), args, flags)] if T else []


def fit_update_launches(vectors_EH, fit_EC, q_H, d_H, stats, beta, beta_fit, skips_E, table_dtype):
    """One program per expert (its EMA and line) and one for the direction's power step."""
    E, H = vectors_EH.shape
    for name, t in (("vectors_EH", vectors_EH), ("fit_EC", fit_EC), ("q_H", q_H), ("d_H", d_H), ("skips_E", skips_E)):
        in_place(name, t)
    table = torch.empty(2 * E + 1, H, dtype=table_dtype, device=vectors_EH.device)
    d_used = torch.empty(H, dtype=torch.float32, device=vectors_EH.device)
    updated = torch.empty(E, dtype=torch.bool, device=vectors_EH.device)
    args = (vectors_EH, fit_EC, q_H, d_H, stats.contiguous(), table, d_used, updated, skips_E, H, E, 1.0 - beta,
            1.0 - beta_fit, FIT_RIDGE)  # fmt: skip
    return (table, d_used, updated), [Launch(KF._fit_update_kernel, (E + 1,), args, dict(BLOCK_H=BLOCK_H))]


LAUNCHES = dict(expert_stats=expert_stats_launches, ema_update=ema_update_launches, fit_update=fit_update_launches,
                default_weights=default_weights_launches,
                default_weights_backward=default_weights_backward_launches,
                probe_draw=probe_draw_launches, probe_add=probe_add_launches, probe_coordinates=probe_coordinates_launches,
                probe_exclude=probe_exclude_launches,
                probe_zero=probe_zero_launches)  # fmt: skip


def launcher(op: str):
    """The op's CUDA kernel: its launches run, its outputs returned."""
    build = LAUNCHES[op]

    def launch(*args, **kwargs):
        outputs, launches = build(*args, **kwargs)
        run(launches)
        return outputs

    launch.__name__ = op
    return launch


expert_stats = launcher("expert_stats")
ema_update_ = launcher("ema_update")
default_weights = launcher("default_weights")
default_weights_backward = launcher("default_weights_backward")
probe_draw = launcher("probe_draw")
probe_add = launcher("probe_add")
probe_coordinates = launcher("probe_coordinates")
probe_exclude = launcher("probe_exclude")
probe_zero = launcher("probe_zero")
fit_update = launcher("fit_update")
