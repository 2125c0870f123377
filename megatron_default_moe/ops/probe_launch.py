"""Launches of the probes' Triton kernels (``ops/kernels/probes.py``): the draw, the probes added
to the routing, the probe rows' coordinates, their exclusion with statistics, their gradient zeroed.
``ops/launch.py`` registers them with the other ops' launchers."""

import torch
import triton

from megatron_default_moe.ops.kernels import probes as KP
from megatron_default_moe.ops.launching import Launch, in_place


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
    in_place("out_RH", out_RH)
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
    in_place("x_RH", x_RH)
    B, H = rows_B.numel(), x_RH.shape[1]
    args = (x_RH, H, rows_B.contiguous(), p_B.contiguous(), H, B)
    grid = (triton.cdiv(B, ZERO_BLOCK_B), triton.cdiv(H, ZERO_BLOCK_H))
    flags = dict(BLOCK_B=ZERO_BLOCK_B, BLOCK_H=ZERO_BLOCK_H)
    return None, [Launch(KP._probe_zero_kernel, grid, args, flags)] if B and H else []
