"""The ``shared-1`` fit's math (``estimators/shared_fit.py``) and its update as one op: pure torch, no Megatron.

State, fp32: ``vectors`` ``[E, H]`` (EMA of the mean ``y``, decay ``β``, as for the constant),
``fit`` ``[E, 2H + 3]`` (EMA of the means of ``y``, ``s·y``, ``s``, ``s²``, decay ``β_fit``, and
the EMA of 1, the weight ``1 − β_fit^n`` those moments carry after ``n`` updates from zero),
``q`` ``[H]`` (EMA of ``C d``, decay ``β_fit``) and ``d = q / ‖q‖``, kept beside it so a pass
reads it without a norm. A slope has ``H`` values per expert and a few probes per micro-batch
estimate it, so its window must hold many more samples than ``H`` (``β_fit`` close to 1,
``shared_fit.fit_beta``); the intercept follows the recent mean:

    B_i = (E[s·y] − E[s] E[y]) / Var(s)    (β_fit window),        A_i = Ê_i − E[s] B_i.

The moments enter debiased (divided by their weight, as Adam's): a window of ``16 H`` probes
fills over thousands of steps, and moments scaled by ``c`` and ``c²`` would bend the slope for all
of them (docs/evidence.md, "The fit's warm-up").

``fit_update`` takes the statistics reduced over the stage (``[E + 1, 2H + 3]``, ``shared_fit``)
and does in one op (one Triton kernel on CUDA, ``triton_fit_kernels._fit_update_kernel``): both EMAs
(``functional.ema_update_``'s rule: experts without probes or with a NaN/Inf anywhere in their row
keep theirs), the lines, written as the term's table ``[A; B]`` ``[2E, H]`` in the activations'
dtype, and one power step of ``q``. The table's last row ``2E`` is the new ``d`` in that dtype:
the next pass's coordinates read it without a cast of their own (``[A; B; d]``, ``[2E + 1, H]``).
"""

import torch

from megatron_default_moe import functional as F
from megatron_default_moe.ops.probe_draw import probe_seed, uniform_keys

RIDGE = 1e-3  # relative ridge of the slope, as the oracle's fit (``oracle_fits``)


def initial_direction_H(hidden: int, seed: int, layer_number, device) -> torch.Tensor:
    """A unit start for the power steps, the same bits on every rank and device."""
    d_H = uniform_keys(hidden, probe_seed(seed, 0, layer_number or 0, 1), device) - 0.5
    return d_H / d_H.norm()


def unit(q_H: torch.Tensor) -> torch.Tensor:
    return q_H / q_H.norm().clamp_min(1e-30)


def line_tables(vectors_EH: torch.Tensor, fit_EC: torch.Tensor):
    """``(A, B)`` ``[E, H]``: intercepts and slopes of the least-squares lines from the EMA'd means
    ``fit = [y | s·y | s | s² | weight]`` (debiased) and the recent mean ``vectors``; an expert
    without probes yet has ``B = 0``, ``A = Ê``."""
    hidden = vectors_EH.shape[1]
    moments_EC = fit_EC[:, :-1] / fit_EC[:, -1:].clamp_min(1e-30)
    y_EH, sy_EH = moments_EC[:, :hidden], moments_EC[:, hidden : 2 * hidden]
    m1_E1, m2_E1 = moments_EC[:, 2 * hidden : 2 * hidden + 1], moments_EC[:, 2 * hidden + 1 :]
    var_E1 = (m2_E1 - m1_E1 * m1_E1).clamp_min(0.0)
    b_EH = (sy_EH - m1_E1 * y_EH) / (var_E1 * (1.0 + RIDGE) + 1e-6 * m2_E1 + 1e-30)
    return vectors_EH - m1_E1 * b_EH, b_EH


def direction_step_(q_H: torch.Tensor, d_H: torch.Tensor, input_row: torch.Tensor, beta: float) -> None:
    """One power step in place: ``q ← β q + (1-β) C d``, ``C`` the covariance of the stage's tokens
    (``input_row = [Σ x·s | Σ x | 0 | 0 | n]``, ``s = x·d``), then ``d ← q / ‖q‖``; both kept when
    there are no tokens or a NaN/Inf. No host sync."""
    hidden = q_H.numel()
    n = input_row[-1].clamp_min(1.0)
    sum_xs, sum_x = input_row[:hidden], input_row[hidden : 2 * hidden]
    cd_H = (sum_xs - sum_x * ((sum_x * d_H).sum() / n)) / n
    ok = (input_row[-1] > 0) & torch.isfinite(cd_H).all()
    q_H.lerp_(torch.where(ok, cd_H, q_H), 1.0 - beta)
    d_H.copy_(unit(q_H))


def fit_update_reference(vectors_EH: torch.Tensor, fit_EC: torch.Tensor, q_H: torch.Tensor, d_H: torch.Tensor,
                         stats: torch.Tensor, beta: float, beta_fit: float, skips_E: torch.Tensor,
                         table_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The update in place (``vectors``, ``fit``, ``q``, ``d``, ``skips``); returns ``(table``
    ``[A; B; d]`` in ``table_dtype`` (``d`` after the step), the direction the statistics were
    taken with (``d`` before the step), ``updated_E)``."""
    experts, hidden = vectors_EH.shape
    stats_EW = stats[:experts]
    updated_E1, nonfinite_E1 = F.ema_masks_E1(stats_EW)
    means_EW = stats_EW / torch.where(updated_E1, stats_EW[:, -1:], 1.0)  # the count's column: its weight, 1
    vectors_EH.lerp_(torch.where(updated_E1, means_EW[:, :hidden], vectors_EH), 1.0 - beta)
    fit_EC.lerp_(torch.where(updated_E1, means_EW, fit_EC), 1.0 - beta_fit)
    skips_E += nonfinite_E1.squeeze(-1)
    a_EH, b_EH = line_tables(vectors_EH, fit_EC)
    d_used = d_H.clone()
    direction_step_(q_H, d_H, stats[experts], beta_fit)
    return torch.cat([a_EH, b_EH, d_H[None]]).to(table_dtype), d_used, updated_E1.squeeze(-1)


fit_update = torch.library.custom_op("default_moe::fit_update", mutates_args=("vectors_EH", "fit_EC", "q_H", "d_H",
                                                                              "skips_E"))(fit_update_reference)  # fmt: skip


@fit_update.register_fake
def _(vectors_EH, fit_EC, q_H, d_H, stats, beta, beta_fit, skips_E, table_dtype):
    experts, hidden = vectors_EH.shape
    return (vectors_EH.new_empty(2 * experts + 1, hidden, dtype=table_dtype), d_H.new_empty(hidden),
            skips_E.new_empty(experts, dtype=torch.bool))  # fmt: skip


def fit_tables(vectors_EH, fit_EC, d_H, dtype) -> torch.Tensor:
    """``[A; B; d]`` of the current state (evaluation, step mode between updates; several kernels)."""
    return torch.cat([*line_tables(vectors_EH, fit_EC), d_H[None]]).to(dtype)
