"""The hot path's small steps as custom ops: one Triton kernel each on CUDA, their torch reference
(the code below) elsewhere (pure torch, no Megatron).

Between the expert output and the default vectors Default MoE does ~25 small elementwise steps
(row weights, per-expert sums and counts, the EMA and its bookkeeping, the bf16 snapshot). On a
GPU each would be a kernel launch (~4 µs): more than the one read of the expert output they
serve. These ops cover them, each one Triton kernel (``ops/kernels/ema.py``) on CUDA, with its
reference as the fallback when the kernel cannot run there (``fallback.py``):

- ``expert_stats``: the ``[E, H+1]`` statistics of ``statistics.expert_output_stats_EH1``, one
  read of the sampled expert-output rows (its reference: one matmul with a weight matrix; on
  CUDA two kernels: per-chunk partial sums over enough programs to fill the GPU, then their
  per-expert sum in a fixed order);
- ``ema_update``: ``functional.ema_update_`` plus the skip counter and the snapshot cast;
- ``default_weights`` / ``default_weights_backward``: the router's default weights
  (``functional.router_scores_TE`` + ``default_weights_TE``), written in the dtype that reads
  them, and their logits gradient (scores recomputed) added to Megatron's own logits gradient;
- ``probe_draw`` / ``probe_exclude`` / ``probe_zero``: the probes' draw, the exclusion of their
  rows (with ``shared-1``, the line's statistics too) and the zeroing of those rows' gradient,
  defined with the probes (``ops/probe_draw.py``, ``ops/probes.py``) and registered here with the others;
- ``fit_update``: the ``shared-1`` fit's EMA, lines and power step (``ops/fit.py``).

Rows are sampled ``offset, offset + stride, ...`` (``C`` of them); ``stride = 1`` takes all.
Each op is an opaque ``torch.library`` op (its torch body: ``<op>_reference``), so
``examples/benchmark_cost.py`` counts it as the kernels it is on a GPU.
"""

from typing import Optional

import torch

from megatron_default_moe.ops import fallback as fallback
from megatron_default_moe import functional as F
from megatron_default_moe.ops.fit import fit_update, fit_update_reference
from megatron_default_moe.ops.probe_draw import probe_add, probe_add_reference, probe_draw, probe_draw_reference
from megatron_default_moe.ops.probes import (
    probe_coordinates,
    probe_coordinates_reference,
    probe_exclude,
    probe_exclude_reference,
    probe_zero,
    probe_zero_reference,
)


def row_weights(p_R: torch.Tensor, uniform: bool):
    """Per row ``(sum weight, count weight)`` from its prob (fp32): ``uniform`` ``(1/p, 1)``,
    ``router`` ``(1, p)``; a padding row (``p = 0``) gets ``(0, 0)``, a NaN prob stays NaN."""
    one_R = torch.where(p_R == 0, 0.0, p_R / p_R)
    if uniform:
        return torch.where(p_R == 0, 0.0, p_R.reciprocal()), one_R
    return one_R, p_R


def _sampled(p_R, offset, stride, cols):
    """Probs (fp32) and row indices of the ``cols`` sampled rows."""
    rows_C = torch.arange(cols, device=p_R.device) * stride + offset
    return p_R[offset::stride][:cols].float(), rows_C


def expert_stats_reference(
    out_CH: torch.Tensor,
    p_R: torch.Tensor,
    counts_L: torch.Tensor,
    offset: int,
    stride: int,
    first: int,
    num_experts: int,
    uniform: bool,
    count_rows: bool,
) -> torch.Tensor:
    """fp32 ``[E, H+1]`` (``statistics.expert_output_stats_EH1``): local expert ``l`` at row
    ``first + l`` holds the weighted sum of its sampled rows ``out_CH`` (rows ``offset, offset +
    stride, ...``; ``p_R`` holds every row's prob) and its count weight summed (0 unless
    ``count_rows``); other rows 0. A NaN/Inf row makes its own expert's sums NaN (the EMA then
    skips that expert), no other's; rows past the counts never count. Here one matmul in
    ``out_CH``'s dtype: a ``[L+1, 2, C]`` weight matrix holds ``hi, lo`` (in that dtype) of each
    row's weight, ``L`` rows past the counts; the CUDA kernel reads each expert's rows once and
    weights them in fp32 instead."""
    local, cols, hidden = counts_L.numel(), out_CH.shape[0], out_CH.shape[1]
    p_C, rows_C = _sampled(p_R, offset, stride, cols)
    ids_C = torch.searchsorted(counts_L.cumsum(0), rows_C, right=True)  # local expert; L: past the counts
    w_C, count_w_C = row_weights(p_C, uniform)
    split_2C = torch.empty(2, cols, dtype=out_CH.dtype, device=p_R.device)
    split_2C[0].copy_(w_C)
    torch.sub(w_C, split_2C[0], out=split_2C[1])
    matrix = torch.zeros(local + 1, 2, cols, dtype=out_CH.dtype, device=p_R.device)
    matrix.scatter_(0, ids_C.view(1, 1, cols).expand(1, 2, cols), split_2C.unsqueeze(0))
    # a weight-0 entry times a NaN/Inf row is NaN: zero such rows, then mark their expert only
    finite_C = torch.isfinite(out_CH).all(dim=1)
    finite_CH = out_CH.nan_to_num(0.0, 0.0, 0.0)
    sums_LSH = F.mm_fp32(matrix.view(2 * (local + 1), cols), finite_CH).view(local + 1, 2, hidden)
    poisoned_L1 = torch.zeros(local + 1, 1, device=out_CH.device).index_add_(0, ids_C, (~finite_C).float()[:, None])
    out_EH1 = torch.zeros(num_experts, hidden + 1, dtype=torch.float32, device=out_CH.device)
    mine_LH1 = out_EH1[first : first + local]
    torch.sum(sums_LSH[:local], dim=1, out=mine_LH1[:, :hidden])
    mine_LH1[:, :hidden].masked_fill_(poisoned_L1[:local] > 0, float("nan"))
    if count_rows:
        counts = torch.zeros(local + 1, device=out_CH.device).index_add_(0, ids_C, count_w_C)
        mine_LH1[:, hidden] = counts[:local]
    return out_EH1


expert_stats = torch.library.custom_op(
    "default_moe::expert_stats", mutates_args=()
)(expert_stats_reference)


@expert_stats.register_fake
def _(out_CH, p_R, counts_L, offset, stride, first, num_experts, uniform, count_rows):
    return out_CH.new_empty(num_experts, out_CH.shape[1] + 1, dtype=torch.float32)


def ema_update_reference(
    defaults_EH: torch.Tensor, stats_EH1: torch.Tensor, beta: float, skips_E: torch.Tensor, snapshot_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``functional.ema_update_`` in place, ``skips_E += nonfinite``; returns ``(snapshot`` of the
    new vectors in ``snapshot_dtype``, ``updated_E)``."""
    updated_E, nonfinite_E = F.ema_update_(defaults_EH, stats_EH1, beta)
    skips_E += nonfinite_E
    return defaults_EH.to(snapshot_dtype, copy=True), updated_E


ema_update = torch.library.custom_op(
    "default_moe::ema_update", mutates_args=("defaults_EH", "skips_E")
)(ema_update_reference)


@ema_update.register_fake
def _(defaults_EH, stats_EH1, beta, skips_E, snapshot_dtype):
    snapshot_EH = defaults_EH.new_empty(defaults_EH.shape, dtype=snapshot_dtype)
    return snapshot_EH, skips_E.new_empty(skips_E.shape, dtype=torch.bool)


def default_weights_reference(
    logits_TE: torch.Tensor,
    probs_TE: torch.Tensor,
    selected_TE: torch.Tensor,
    score_function: str,
    renormalise: bool,
    all_experts: bool,
    scale: float,
    eps: float,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``functional.default_weights_TE(router_scores_TE(logits))`` as one op, ``[T, E]`` in
    ``dtype`` (fp32 if None), differentiable in the logits; its backward is one op too
    (``default_weights_backward``)."""
    scores_TE = F.router_scores_TE(logits_TE, score_function)
    normaliser = "all" if all_experts else "selected"
    weights_TE = F.default_weights_TE(scores_TE, probs_TE, selected_TE, scale, renormalise, eps, normaliser)
    return weights_TE if dtype is None else weights_TE.to(dtype)


default_weights = torch.library.custom_op(
    "default_moe::default_weights", mutates_args=()
)(default_weights_reference)


@default_weights.register_fake
def _(logits_TE, probs_TE, selected_TE, score_function, renormalise, all_experts, scale, eps, dtype=None):
    return logits_TE.new_empty(logits_TE.shape, dtype=dtype or torch.float32)


def default_weights_backward_reference(
    grad: torch.Tensor,
    logits_TE: torch.Tensor,
    probs_TE: torch.Tensor,
    selected_TE: torch.Tensor,
    score_function: str,
    renormalise: bool,
    all_experts: bool,
    scale: float,
    eps: float,
    base_TE: Optional[torch.Tensor] = None,
    s_T1: Optional[torch.Tensor] = None,
    x_TH: Optional[torch.Tensor] = None,
    d_H: Optional[torch.Tensor] = None,
    table_KH: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``dL/dlogits`` of ``default_weights`` (in the logits' dtype) from ``grad = dL/dw``: ``dL/df =
    g · c/sg(N)`` where the prob is 0, then the score function's backward (scores recomputed,
    nothing extra saved), plus ``base_TE`` (the logits' other gradient: Megatron's routing) in the
    same pass. With ``table_KH`` (``[K, H]``, K = E or 2E) ``grad`` is the default term's ``dL/dy``
    ``[T, H]`` and ``dL/dw = dL/dy @ tableᵀ`` is formed here in fp32 (the term's backward needs no
    pass of its own, and no ``[T, K]`` is written and read back). With the ``shared-1`` coordinates
    ``s_T1`` (fp32 ``[T, 1]``) ``dL/dw`` is the term's ``[T, 2E]`` ``[g_A | g_B]`` (any float dtype)
    and ``g = g_A + s ⊙ g_B`` is formed here in fp32; or ``s = x · d`` from its factors ``x_TH``,
    ``d_H`` (the router's input, which Megatron's router GEMM keeps for its backward anyway)."""
    grad_TE = grad
    if table_KH is not None:
        grad_TE = F.mm_fp32(grad.reshape(-1, table_KH.shape[1]), table_KH.to(grad.dtype).t())
    if x_TH is not None:
        s_T1 = F.mm_fp32(x_TH, d_H[:, None])
    if s_T1 is not None:
        experts = logits_TE.shape[1]
        grad_TE = torch.addcmul(grad_TE[:, :experts].float(), s_T1.float(), grad_TE[:, experts:].float())
    f_TE = F.router_scores_TE(logits_TE, score_function)
    normaliser = "all" if all_experts else "selected"
    c_over_n = F.default_scale_T1(f_TE, selected_TE, scale, renormalise, eps, normaliser)
    df_TE = grad_TE.float() * torch.where(probs_TE != 0, 0.0, c_over_n)
    if score_function == "softmax":
        dz_TE = f_TE * (df_TE - (f_TE * df_TE).sum(dim=-1, keepdim=True))
    elif score_function == "sigmoid":
        dz_TE = df_TE * (1.0 - f_TE) * f_TE
    else:  # f = sqrt(softplus(z)): df/dz = sigmoid(z) / (2 f)
        dz_TE = df_TE * torch.sigmoid(logits_TE.float()) / (2.0 * f_TE)
    if base_TE is not None:
        dz_TE = dz_TE + base_TE.float()
    return dz_TE.to(logits_TE.dtype)


default_weights_backward = torch.library.custom_op(
    "default_moe::default_weights_backward", mutates_args=()
)(default_weights_backward_reference)


@default_weights_backward.register_fake
def _(grad, logits_TE, probs_TE, selected_TE, score_function, renormalise, all_experts, scale, eps, base_TE=None,
      s_T1=None, x_TH=None, d_H=None, table_KH=None):  # fmt: skip
    return torch.empty_like(logits_TE)


def _weights_setup(ctx, inputs, output):
    logits_TE, probs_TE, selected_TE, *options, _ = inputs  # options without the output dtype
    ctx.options = options
    ctx.save_for_backward(logits_TE, probs_TE, selected_TE)


def _weights_backward(ctx, grad_TE):
    logits_TE, probs_TE, selected_TE = ctx.saved_tensors
    dz_TE = default_weights_backward(grad_TE, logits_TE, probs_TE, selected_TE, *ctx.options)
    return (dz_TE,) + (None,) * 8


default_weights.register_autograd(_weights_backward, setup_context=_weights_setup)


OPS = {  # name: (op, its torch reference)
    "expert_stats": (expert_stats, expert_stats_reference),
    "ema_update": (ema_update, ema_update_reference),
    "default_weights": (default_weights, default_weights_reference),
    "default_weights_backward": (default_weights_backward, default_weights_backward_reference),
    "probe_draw": (probe_draw, probe_draw_reference),  # the probes' ops: ops/probe_draw.py, ops/probes.py
    "probe_add": (probe_add, probe_add_reference),
    "probe_coordinates": (probe_coordinates, probe_coordinates_reference),
    "probe_exclude": (probe_exclude, probe_exclude_reference),
    "probe_zero": (probe_zero, probe_zero_reference),
    "fit_update": (fit_update, fit_update_reference),  # the shared-1 fit's update (ops/fit.py)
}
TRITON_ON_CUDA = fallback.register(OPS) if torch.cuda.is_available() else None
