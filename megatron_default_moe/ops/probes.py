"""The probes' exclusion as ops, on the expert rank (``estimators/probes.py``); their draw on the
token's rank is ``ops/probe_draw.py``.

Unfused, the exclusion is ~20 small torch kernels per layer and micro-batch. Each op is one
Triton kernel on CUDA (``ops/kernels/probes.py``) and the reference below elsewhere (pure torch,
no Megatron):

- ``probe_coordinates``: the ``shared-1`` line's coordinates ``x · d`` of the probe rows;
- ``probe_exclude``: the probe rows' per-expert statistics, and those rows zeroed in place (only
  they are touched); the kernel sums in another order (fp32 rounding);
- ``probe_zero``: the same rows of the gradient zeroed in place, in the backward.
"""

from typing import Optional

import torch

from megatron_default_moe import functional as F
from megatron_default_moe.ops.probe_draw import (  # noqa: F401  (0.2's probe_ops, moved.py, held the draw too)
    PROBE_DRAWS,
    PROBE_PROB,
    draw_probes,
    hashed_keys,
    probe_draw,
    probe_draw_reference,
    probe_seed,
    uniform_keys,
)
def probe_coordinates_reference(in_RH: torch.Tensor, rows_B: torch.Tensor, p_B: torch.Tensor,
                                d_H: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """``s = x · d`` (fp32 ``[B]``) of the probe rows (``p < 0``) among ``rows_B`` of the expert
    input ``in_RH`` (``d`` in its dtype), 0 at the other candidates: the ``shared-1`` line's
    coordinates for ``probe_exclude``. One op (the kernel reads only the probe rows), where a
    gather of every candidate row and a GEMV were two."""
    s_B = F.mm_fp32(in_RH.index_select(0, rows_B), d_H[:, None])[:, 0]
    return torch.where(p_B < 0, s_B, 0.0)


probe_coordinates = torch.library.custom_op("default_moe::probe_coordinates", mutates_args=())(
    probe_coordinates_reference
)


@probe_coordinates.register_fake
def _(in_RH, rows_B, p_B, d_H):
    return rows_B.new_empty(rows_B.shape, dtype=torch.float32)


def probe_exclude_reference(out_RH: torch.Tensor, rows_B: torch.Tensor, p_B: torch.Tensor, counts_L: torch.Tensor,
                            first: int, num_experts: int, count_rows: bool, s_B: Optional[torch.Tensor] = None,
                            in_RH: Optional[torch.Tensor] = None) -> torch.Tensor:  # fmt: skip
    """Per-expert ``[Σ |p|·E_i(x) | Σ |p|]`` over the probe rows (``p < 0``) among ``rows_B``, fp32
    ``[E, H+1]`` (a row holds ``out = p·E_i(x)``: its weighted output is ``-out``; a NaN/Inf
    probe row poisons its own expert only; the count column stays 0 unless ``count_rows``), and
    those rows of ``out_RH`` zeroed in place (the other rows ``rows_B`` names are left as they are).

    With the rows' coordinates ``s_B`` and the experts' input rows ``in_RH`` (``shared_fit``): the
    line's statistics ``[E + 1, 2H + 3]``, row ``i < E`` ``[Σ|p|y | Σ|p|s·y | Σ|p|s | Σ|p|s² | Σ|p|]``,
    row ``E`` the probe tokens' ``[Σ x·s | Σ x | 0 | 0 | n]`` (unweighted: the tokens are a uniform
    sample of the micro-batch's); the ``s`` columns and row ``E`` only with ``count_rows``."""
    hidden, local = out_RH.shape[1], counts_L.numel()
    ids_B = torch.searchsorted(counts_L.cumsum(0), rows_B, right=True)  # local expert; L: past the counts
    is_probe_B = p_B < 0
    keep_B = is_probe_B & (ids_B < local)
    x_BH = out_RH.index_select(0, rows_B)
    y_BH = torch.where(keep_B[:, None], -x_BH.float(), 0.0)
    w_B = torch.where(keep_B, -p_B.float(), 0.0)
    line = s_B is not None
    width = 2 * hidden + 3 if line else hidden + 1
    sums_LW = out_RH.new_zeros(local + 1, width, dtype=torch.float32)
    sums_LW[:, :hidden].index_add_(0, ids_B, y_BH)
    if line:
        s_B1 = torch.where(keep_B, s_B.float(), 0.0)[:, None]  # a routed row's NaN coordinate stays out
        sums_LW[:, hidden : 2 * hidden].index_add_(0, ids_B, y_BH * s_B1)
        if count_rows:
            ws_B1 = w_B[:, None] * s_B1
            sums_LW[:, 2 * hidden : 2 * hidden + 2].index_add_(0, ids_B, torch.cat([ws_B1, ws_B1 * s_B1], dim=1))
    if count_rows:
        sums_LW[:, -1].index_add_(0, ids_B, w_B)
    out_EW = out_RH.new_zeros(num_experts + line, width, dtype=torch.float32)
    out_EW[first : first + local] = sums_LW[:local]
    if line and count_rows:
        x_in_BH = torch.where(keep_B[:, None], in_RH.index_select(0, rows_B).float(), 0.0)
        out_EW[num_experts, : 2 * hidden] = torch.cat([s_B1.t() @ x_in_BH, x_in_BH.sum(0, keepdim=True)], 1)[0]
        out_EW[num_experts, -1] = keep_B.sum()
    _zero_rows_(out_RH, rows_B, is_probe_B, x_BH)
    return out_EW


def _zero_rows_(x_RH, rows_B, is_probe_B, x_BH):
    """The probe rows among ``rows_B`` of ``x_RH`` zeroed in place (NaN rows too); ``x_BH``: those rows."""
    x_RH.index_copy_(0, rows_B, x_BH.masked_fill(is_probe_B[:, None], 0.0))


def probe_zero_reference(x_RH: torch.Tensor, rows_B: torch.Tensor, p_B: torch.Tensor) -> None:
    """The probe rows (``p < 0``) among ``rows_B`` of ``x_RH`` zeroed in place: the gradient of the
    rows ``probe_exclude`` zeroed."""
    _zero_rows_(x_RH, rows_B, p_B < 0, x_RH.index_select(0, rows_B))


probe_exclude = torch.library.custom_op("default_moe::probe_exclude", mutates_args=("out_RH",))(
    probe_exclude_reference
)
probe_zero = torch.library.custom_op("default_moe::probe_zero", mutates_args=("x_RH",))(probe_zero_reference)


@probe_exclude.register_fake
def _(out_RH, rows_B, p_B, counts_L, first, num_experts, count_rows, s_B=None, in_RH=None):
    if s_B is None:
        return out_RH.new_empty(num_experts, out_RH.shape[1] + 1, dtype=torch.float32)
    return out_RH.new_empty(num_experts + 1, 2 * out_RH.shape[1] + 3, dtype=torch.float32)


@probe_zero.register_fake
def _(x_RH, rows_B, p_B):
    return None
