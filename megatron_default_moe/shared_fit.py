"""``--moe-default-fit shared-1``: a default that follows the token, fitted online from the probes.

A constant ``Ê_i`` stands in for ``E_i(x_t)`` on every token that did not choose expert ``i``;
with a renormalised router that misses most of the gradient (README, "Richer defaults"). Here

    V_{t,i} = a_i + s_t b_i,        s_t = x_t · d

``d`` the leading principal direction of the layer's input (one for all experts: a power step per
update on the stage's tokens), ``(a_i, b_i)`` the least-squares line of ``E_i(x)`` on ``s`` over
the probe rows (unchosen pairs, weight ``|p|``). The statistics ride the layer's one all-reduce,
``[E + 1, 2H + 3]`` fp32, sums over the stage:

- row ``i < E`` (probe rows of expert ``i``): ``[Σ|p|y | Σ|p|s·y | Σ|p|s | Σ|p|s² | Σ|p|]``;
- row ``E`` (the router's tokens): ``[Σ x·s | Σ x | 0 | 0 | n]``.

State (fp32, checkpointed, identical on every rank): ``default_vectors`` (EMA of the mean ``y``,
as for the constant), ``default_fit`` ``[E, H + 2]`` (EMA of the means of ``s·y``, ``s``, ``s²``)
and ``default_direction`` ``[H]`` (EMA of ``C d``, ``C`` the tokens' covariance; ``d`` is it
normalised). The term: forward ``w @ A + s ⊙ (w @ B)``, backward ``dL/dw = G Aᵀ + s ⊙ (G Bᵀ)``
(``functional.add_default_term``). Pure torch: no Megatron import.
"""

import torch

from megatron_default_moe import fused
from megatron_default_moe.functional import mm_fp32
from megatron_default_moe.probe_ops import probe_seed, uniform_keys

FITS = ("constant", "shared-1")
TABLES = ("default_vectors", "default_fit")  # zero both and the term vanishes (TopK)
RIDGE = 1e-3  # relative ridge of the slope, as the oracle's fit (``oracle_fits``)


def initial_direction_H(hidden: int, seed: int, layer_number, device) -> torch.Tensor:
    """A unit start for the power steps, the same bits on every rank and device."""
    d_H = uniform_keys(hidden, probe_seed(seed, 0, layer_number or 0, 1), device) - 0.5
    return d_H / d_H.norm()


def unit(q_H: torch.Tensor) -> torch.Tensor:
    return q_H / q_H.norm().clamp_min(1e-30)


def coordinates_T1(x_TH: torch.Tensor, d_H: torch.Tensor) -> torch.Tensor:
    """``s = x · d`` per token, fp32 ``[T, 1]`` (detached)."""
    x_TH = x_TH.detach().reshape(-1, x_TH.shape[-1])
    return mm_fp32(x_TH, d_H.to(x_TH.dtype)[:, None])


def input_stats_row(x_TH: torch.Tensor, s_T1: torch.Tensor) -> torch.Tensor:
    """Row ``E`` of the statistics: ``[Σ x·s | Σ x | 0 | 0 | n]`` over the router's tokens."""
    x_TH = x_TH.detach().reshape(-1, x_TH.shape[-1])
    hidden = x_TH.shape[1]
    row = s_T1.new_zeros(2 * hidden + 3)
    row[:hidden] = mm_fp32(x_TH.t(), s_T1.to(x_TH.dtype)).squeeze(1)
    row[hidden : 2 * hidden] = x_TH.sum(0, dtype=torch.float32)
    row[-1] = x_TH.shape[0]
    return row


def probe_line_stats(out_RH, in_RH, rows_B, p_B, counts_L, first: int, num_experts: int, d_H, count_rows: bool):
    """``[Σ|p|s·y | Σ|p|s | Σ|p|s²]`` ``[E, H + 2]`` over the probe rows (``p < 0``) among
    ``rows_B``: ``out`` holds ``p·E_i(x)``, ``in`` the token ``x``. Read before the rows are zeroed.
    The ``s`` columns only where ``count_rows`` (once per expert-TP group, like the counts)."""
    hidden, local = out_RH.shape[1], counts_L.numel()
    ids_B = torch.searchsorted(counts_L.cumsum(0), rows_B, right=True)
    keep_B = (p_B < 0) & (ids_B < local)
    w_B = torch.where(keep_B, -p_B.float(), 0.0)
    s_B = in_RH.detach().index_select(0, rows_B).float() @ d_H
    y_BH = torch.where(keep_B[:, None], -out_RH.index_select(0, rows_B).float(), 0.0)  # |p|·E_i(x)
    sums_LC = out_RH.new_zeros(local + 1, hidden + 2, dtype=torch.float32)
    sums_LC[:, :hidden].index_add_(0, ids_B, y_BH * s_B[:, None])
    if count_rows:
        sums_LC[:, hidden].index_add_(0, ids_B, w_B * s_B)
        sums_LC[:, hidden + 1].index_add_(0, ids_B, w_B * s_B * s_B)
    out_EC = out_RH.new_zeros(num_experts, hidden + 2, dtype=torch.float32)
    out_EC[first : first + local] = sums_LC[:local]
    return out_EC


def assemble_stats(probe_EH1, line_EC, input_row):
    """The ``[E + 1, 2H + 3]`` statistics from the probes' ``[Σ|p|y | Σ|p|]``, ``probe_line_stats``
    and ``input_stats_row``."""
    experts = torch.cat([probe_EH1[:, :-1], line_EC, probe_EH1[:, -1:]], dim=1)
    return torch.cat([experts, input_row[None]], dim=0)


def line_tables(state_EC: torch.Tensor, hidden: int):
    """``(A, B)`` ``[E, H]``: intercepts and slopes of the least-squares lines from the EMA'd means
    ``[y | s·y | s | s²]``; an expert without probes yet has ``B = 0``, ``A = Ê``."""
    y_EH, sy_EH = state_EC[:, :hidden], state_EC[:, hidden : 2 * hidden]
    m1_E1, m2_E1 = state_EC[:, 2 * hidden : 2 * hidden + 1], state_EC[:, 2 * hidden + 1 :]
    var_E1 = (m2_E1 - m1_E1 * m1_E1).clamp_min(0.0)
    b_EH = (sy_EH - m1_E1 * y_EH) / (var_E1 * (1.0 + RIDGE) + 1e-6 * m2_E1 + 1e-30)
    return y_EH - m1_E1 * b_EH, b_EH


def direction_step_(q_H: torch.Tensor, input_row: torch.Tensor, beta: float) -> None:
    """One power step in place: ``q ← β q + (1-β) C d``, ``C`` the covariance of the stage's tokens
    (``input_row``), ``d = q / ‖q‖``; kept when there are no tokens or a NaN/Inf. No host sync."""
    hidden = q_H.numel()
    n = input_row[-1]
    sum_xs, sum_x = input_row[:hidden], input_row[hidden : 2 * hidden]
    cd_H = (sum_xs - sum_x * (sum_x @ unit(q_H)) / n.clamp_min(1.0)) / n.clamp_min(1.0)
    ok = (n > 0) & torch.isfinite(cd_H).all()
    q_H.lerp_(torch.where(ok, cd_H, q_H), 1.0 - beta)


def apply_fit(vectors_EH, fit_EC, q_H, stats, beta: float, skips_E, d_H, dtype):
    """The EMA step of every table from statistics reduced over the stage; returns ``(A, B, d)``
    of this pass in ``dtype`` (``d``: the direction the statistics were taken with) and the
    experts updated."""
    experts, hidden = vectors_EH.shape
    state_EC = torch.cat([vectors_EH, fit_EC], dim=1)
    snapshot_EC, updated_E = fused.ema_update(state_EC, stats[:experts], beta, skips_E, torch.float32)
    vectors_EH.copy_(state_EC[:, :hidden])
    fit_EC.copy_(state_EC[:, hidden:])
    direction_step_(q_H, stats[experts], beta)
    a_EH, b_EH = line_tables(snapshot_EC, hidden)
    return (a_EH.to(dtype), b_EH.to(dtype), d_H), updated_E


def frozen_tables(vectors_EH, fit_EC, q_H, dtype):
    """``(A, B, d)`` of the current state (evaluation, step mode between updates)."""
    a_EH, b_EH = line_tables(torch.cat([vectors_EH, fit_EC], dim=1), vectors_EH.shape[1])
    return a_EH.to(dtype), b_EH.to(dtype), unit(q_H)


class SharedLineFit:
    """A layer's ``shared-1`` fit: registers its tables on the layer, and carries one pass's
    direction, coordinates and input row from ``route`` to the expert statistics and the term."""

    def __init__(self, layer, seed: int):
        experts, hidden = layer.default_vectors.shape
        device = layer.default_vectors.device
        layer.register_buffer("default_fit", torch.zeros(experts, hidden + 2, dtype=torch.float32, device=device))
        self.initial_direction = initial_direction_H(hidden, seed, layer.layer_number, device)
        layer.register_buffer("default_direction", self.initial_direction.clone())
        self._x = self._d = self._s = self._row = None

    def see_input(self, layer, x_TH, takes_stats: bool) -> None:
        """``route``: remember ``x``; a pass that takes statistics also fixes its direction, the
        tokens' coordinates on it and the input row."""
        self._x, self._d = x_TH, None
        if takes_stats:
            self._d = unit(layer.default_direction)
            self._s = coordinates_T1(x_TH, self._d)
            self._row = input_stats_row(x_TH, self._s)

    def exclude_with(self, probes, in_RH):
        """``probes.exclude`` that also takes the line statistics of the probe rows (expert rank)."""

        def exclude(out_RH, probs_R, tokens_per_expert_L, first, num_experts, count_rows):
            def line(out, rows_B, p_B, counts_L):
                return probe_line_stats(out, in_RH, rows_B, p_B, counts_L, first, num_experts, self._d, count_rows)

            out_RH, probe_EH1, line_EC = probes.exclude(
                out_RH, probs_R, tokens_per_expert_L, first, num_experts, count_rows, also=line
            )
            return out_RH, assemble_stats(probe_EH1, line_EC, self._row)

        return exclude

    def apply(self, layer, stats, beta: float, dtype):
        """``apply_fit`` on the layer's tables with this pass's direction."""
        d_H = self._d if self._d is not None else unit(layer.default_direction)
        return apply_fit(layer.default_vectors, layer.default_fit, layer.default_direction, stats, beta,
                         layer.nonfinite_skips, d_H, dtype)  # fmt: skip

    def frozen(self, layer, dtype):
        return frozen_tables(layer.default_vectors, layer.default_fit, layer.default_direction, dtype)

    def term_args(self, snapshot):
        """``(A, {slopes_EH, s_T1})`` of ``functional.add_default_term`` for this pass."""
        a_EH, b_EH, d_H = snapshot
        s_T1 = self._s if d_H is self._d else coordinates_T1(self._x, d_H)
        self._x = self._s = None
        return a_EH, dict(slopes_EH=b_EH, s_T1=s_T1)

    def stats_shape(self, experts: int, hidden: int):
        return experts + 1, 2 * hidden + 3
