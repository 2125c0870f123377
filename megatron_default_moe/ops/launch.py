"""Launches of the Triton kernels (``ops/kernels/ema.py``, ``ops/kernels/probes.py``,
``ops/kernels/fit.py``): each op's launcher builds its
``Launch``es in one function, which ``tests/test_triton_aot.py`` compiles for every GPU target, so
the compiled signatures are the launched ones.

The kernels assume row-major rows (row stride ``H``, ``H + 1``, column stride 1): read-only inputs
are made contiguous here (a no-op for Megatron's tensors), a buffer the op writes in place must
already be (``LayoutError`` otherwise: a copy would leave the caller's buffer unchanged).
"""

from typing import NamedTuple

import torch
import triton

from megatron_default_moe.ops.kernels import ema as K
from megatron_default_moe.ops.kernels import fit as KF
from megatron_default_moe.ops.kernels import probes as KP
from megatron_default_moe.ops.fit import RIDGE as FIT_RIDGE

BLOCK_H = 512  # 1-D passes over a row of H
STATS_BLOCK_R, STATS_BLOCK_H = 32, 128  # expert_stats stage 1: a [rows, H] tile per step
STATS_REDUCE_BLOCK_H = 32  # stage 2: columns per program (a hot expert's segments over many programs)
STATS_PROGRAMS = 1024  # stage 1's target grid: ~8 waves of 132 SMs, whatever the shape
STATS_MIN_CHUNK = 64  # rows per program at least: stage 2 reads 1 fp32 row per chunk of rows
SCORES = {"softmax": 0, "sigmoid": 1, "sqrtsoftplus": 2}


class LayoutError(ValueError):
    """An in-place buffer not laid out as the kernel writes it."""


class Launch(NamedTuple):
    kernel: object
    grid: tuple
    args: tuple
    constexprs: dict


def run(launches):
    for k in launches:
        k.kernel[k.grid](*k.args, **k.constexprs)


def _in_place(name, t):
    if not t.is_contiguous():
        raise LayoutError(f"Default MoE: {name} is written in place by a Triton kernel and must be contiguous, "
                          f"got shape {tuple(t.shape)} strides {t.stride()}")  # fmt: skip
    return t


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
    _in_place("defaults_EH", defaults_EH)
    _in_place("skips_E", skips_E)
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


def default_weights_backward_launches(grad_TE, logits_TE, probs_TE, selected_TE, score_function, renormalise,
                                      all_experts, scale, eps, base_TE=None, s_T1=None, x_TH=None, d_H=None):  # fmt: skip
    """One program per token; with ``x_TH`` it forms its ``s = x · d`` first (a loop over ``H``)."""
    T, E = logits_TE.shape
    dz = torch.empty(T, E, dtype=logits_TE.dtype, device=logits_TE.device)
    base = dz if base_TE is None else base_TE.contiguous()
    s = dz if s_T1 is None else s_T1.float().contiguous()  # unread without HAS_S (or with X_DOT)
    x, d = (dz, dz) if x_TH is None else (x_TH.contiguous(), d_H.contiguous())  # unread without X_DOT
    args = (grad_TE.contiguous(), s, x, d, logits_TE.contiguous(), probs_TE.contiguous(), selected_TE.contiguous(),
            base, dz, E, x.shape[1], scale, eps)  # fmt: skip
    flags = dict(SCORE=SCORES[score_function], RENORM=renormalise, ALL=all_experts, HAS_BASE=base_TE is not None,
                 HAS_S=s_T1 is not None or x_TH is not None, X_DOT=x_TH is not None,
                 BLOCK_E=triton.next_power_of_2(E), BLOCK_K=BLOCK_H)  # fmt: skip
    return dz, [Launch(K._weights_bwd_kernel, (T,), args, flags)] if T else []


PROBE_BLOCK_B = 16  # probes per program of probe_draw
ADD_BLOCK_M = 16  # probe_add: a stratum's token rows per program


def _draw_inputs(weights_TE, routing_map_TE, strata_B4, seed):
    """The draw's outputs ``(tokens, experts, probs)`` of ``B`` pairs, and its inputs as both
    kernels read them: bool maps as bytes, the seed as four 16-bit pieces (always int32: one
    compiled kernel whatever the seed)."""
    dev, budget = weights_TE.device, strata_B4.shape[0]
    pairs = tuple(torch.empty(budget, dtype=d, device=dev) for d in (torch.int64, torch.int64, torch.float32))
    w = weights_TE.contiguous()
    w = w.view(torch.uint8) if w.dtype == torch.bool else w  # uniform draws: the blocked pairs
    pieces = tuple((seed >> s) & 0xFFFF for s in (0, 16, 32, 48))
    return pairs, (w, routing_map_TE.contiguous().view(torch.uint8), strata_B4.contiguous()), pieces


def probe_draw_launches(weights_TE, routing_map_TE, strata_B4, m, stride, seed, weighted):
    E, budget = weights_TE.shape[1], strata_B4.shape[0]
    pairs, (w, routed, strata), pieces = _draw_inputs(weights_TE, routing_map_TE, strata_B4, seed)
    args = (w, routed, strata, *pairs, E, budget, m, stride, *pieces)
    flags = dict(WEIGHTED=weighted, BLOCK_B=PROBE_BLOCK_B, BLOCK_E=max(2, triton.next_power_of_2(E)))
    grid = (triton.cdiv(budget, PROBE_BLOCK_B),)
    return pairs, [Launch(KP._probe_draw_kernel, grid, args, flags)] if budget else []


def probe_add_launches(probs_TE, routing_map_TE, weights_TE, strata_B4, m, stride, seed, weighted):
    """One program per (stratum, ``ADD_BLOCK_M`` of its ``m`` positions): each draws its stratum's
    pair (the few ``E``-wide reads again per block of positions) and copies its rows."""
    E, budget = probs_TE.shape[1], strata_B4.shape[0]
    pairs, (w, routed_in, strata), pieces = _draw_inputs(weights_TE, routing_map_TE, strata_B4, seed)
    probs = torch.empty_like(probs_TE, memory_format=torch.contiguous_format)
    routed = torch.empty(probs_TE.shape, dtype=torch.bool, device=probs_TE.device)
    args = (probs_TE.contiguous(), routed_in, w, strata, probs, routed.view(torch.uint8), *pairs, E, m, stride,
            *pieces)  # fmt: skip
    flags = dict(WEIGHTED=weighted, BLOCK_M=ADD_BLOCK_M, BLOCK_E=max(2, triton.next_power_of_2(E)))
    grid = (budget, triton.cdiv(m, ADD_BLOCK_M))
    return (probs, routed, *pairs), [Launch(KP._probe_add_kernel, grid, args, flags)] if budget else []


EXCLUDE_BLOCK_B = 16  # probe_exclude: candidate rows per step (a tl.dot needs 16)


def probe_exclude_launches(out_RH, rows_B, p_B, counts_L, first, num_experts, count_rows, s_B=None, in_RH=None):
    """One program per block of columns, each over all ``B`` candidate rows (a few hundred to a few
    thousand): no atomics, a fixed order. The non-local stats rows are zeros."""
    R, H = out_RH.shape
    _in_place("out_RH", out_RH)
    B, L = rows_B.numel(), counts_L.numel()
    line = s_B is not None
    width = 2 * H + 3 if line else H + 1
    stats = torch.zeros(num_experts + line, width, dtype=torch.float32, device=out_RH.device)
    s_arg, in_arg = (s_B.float().contiguous(), in_RH.contiguous()) if line else (p_B, out_RH)  # unread without LINE
    args = (out_RH, H, rows_B.contiguous(), p_B.contiguous(), counts_L.to(torch.long).contiguous(), stats, s_arg,
            in_arg, in_arg.shape[1], H, B, L, first, num_experts, width)  # fmt: skip
    block_l = max(16, triton.next_power_of_2(L))
    # the [L, h] fp32 accumulators (two, four with the line) stay in registers
    block_h = min(64, max(16, (1024 if line else 2048) // block_l))
    flags = dict(COUNT_ROWS=count_rows, LINE=line, BLOCK_B=EXCLUDE_BLOCK_B, BLOCK_L=block_l, BLOCK_H=block_h)
    return stats, [Launch(KP._probe_exclude_kernel, (triton.cdiv(H, block_h),), args, flags)] if L else []


COORD_BLOCK_B, COORD_BLOCK_H = 16, 128  # probe_coordinates: candidate rows per program, columns per step


def probe_coordinates_launches(in_RH, rows_B, p_B, d_H):
    """One program per block of candidate rows, each over all ``H`` of its probe rows."""
    B, H = rows_B.numel(), in_RH.shape[1]
    if in_RH.stride(1) != 1:
        in_RH = in_RH.contiguous()
    s = torch.empty(B, dtype=torch.float32, device=in_RH.device)
    args = (in_RH, in_RH.stride(0), rows_B.contiguous(), p_B.contiguous(), d_H.contiguous(), s, H, B)
    flags = dict(BLOCK_B=COORD_BLOCK_B, BLOCK_H=COORD_BLOCK_H)
    return s, [Launch(KP._probe_coordinates_kernel, (triton.cdiv(B, COORD_BLOCK_B),), args, flags)] if B else []


ZERO_BLOCK_B, ZERO_BLOCK_H = 16, 256  # probe_zero: a [rows, H] tile per program


def probe_zero_launches(x_RH, rows_B, p_B):
    """One program per (block of candidate rows, block of columns); only probe rows are written."""
    _in_place("x_RH", x_RH)
    B, H = rows_B.numel(), x_RH.shape[1]
    args = (x_RH, H, rows_B.contiguous(), p_B.contiguous(), H, B)
    grid = (triton.cdiv(B, ZERO_BLOCK_B), triton.cdiv(H, ZERO_BLOCK_H))
    flags = dict(BLOCK_B=ZERO_BLOCK_B, BLOCK_H=ZERO_BLOCK_H)
    return None, [Launch(KP._probe_zero_kernel, grid, args, flags)] if B and H else []


def fit_update_launches(vectors_EH, fit_EC, q_H, d_H, stats, beta, beta_fit, skips_E, table_dtype):
    """One program per expert (its EMA and line) and one for the direction's power step."""
    E, H = vectors_EH.shape
    for name, t in (("vectors_EH", vectors_EH), ("fit_EC", fit_EC), ("q_H", q_H), ("d_H", d_H), ("skips_E", skips_E)):
        _in_place(name, t)
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
