"""The Default MoE math, free of Megatron (paper arXiv 2504.12463, Eq. 11 and §3).

Shapes are in the names: ``T`` tokens, ``E`` experts, ``H`` hidden, ``R`` rows the local experts
processed (token-expert pairs, padding rows included).

Forward of one layer, as the Megatron glue wires it:

1. ``default_weights_TE``: the router's full softmax ``π`` where the TopK probs are zero (pairs that
   were not routed, dropped or padded). Gradient flows into ``π``.
2. ``expert_output_stats_EH1``: per expert, the sum of unweighted outputs ``o = out / p`` and a count
   (``uniform``), or the sum of router-weighted outputs ``p * o = out`` and ``Σ p`` (``router``).
3. ``ema_update_``: ``Ê_i ← β Ê_i + (1-β) sum_i / count_i`` for experts with ``count_i > 0`` and
   finite statistics.
4. ``default_term_TH``: ``w @ sg(Ê)``, added to the TopK output (``forward`` mode), or added with its
   value removed (``backward-only`` mode: gradient only).
"""

from typing import Sequence, Union

import torch

EMA_WEIGHTINGS = ("uniform", "router")
MODES = ("forward", "backward-only")


def default_weights_TE(logits_TE: torch.Tensor, probs_TE: torch.Tensor) -> torch.Tensor:
    """Full-softmax weights of the experts a token does not use (fp32, differentiable in logits)."""
    pi_TE = torch.softmax(logits_TE.float(), dim=-1)
    return pi_TE * (probs_TE.detach() == 0)


def row_expert_ids_R(
    tokens_per_expert: Union[torch.Tensor, Sequence[int]], first_expert: int, device
) -> torch.Tensor:
    """Global expert id of every row the local experts processed, in dispatcher order."""
    if isinstance(tokens_per_expert, torch.Tensor):
        counts = tokens_per_expert.to(device=device, dtype=torch.long)
    else:
        counts = torch.tensor(list(tokens_per_expert), dtype=torch.long, device=device)
    ids = torch.arange(first_expert, first_expert + counts.numel(), device=device)
    return torch.repeat_interleave(ids, counts)


def expert_output_stats_EH1(
    out_RH: torch.Tensor,
    probs_R: torch.Tensor,
    expert_ids_R: torch.Tensor,
    num_experts: int,
    weighting: str = "uniform",
    count_rows: bool = True,
) -> torch.Tensor:
    """Per-expert ``[sum | count]`` of this rank's expert outputs, fp32 ``[E, H+1]``.

    ``out_RH`` is what the experts return: already multiplied by the routing prob ``p`` of its row.
    Rows with ``p == 0`` are padding and ignored. ``count_rows=False`` leaves the count column zero
    (expert-tensor-parallel ranks other than the first hold partial sums of rows counted elsewhere).
    """
    out_RH = out_RH.detach().float()
    probs_R = probs_R.detach().float().reshape(-1)
    valid_R = probs_R != 0
    out_RH, probs_R, expert_ids_R = out_RH[valid_R], probs_R[valid_R], expert_ids_R[valid_R]
    stats_EH1 = out_RH.new_zeros(num_experts, out_RH.shape[-1] + 1)
    if weighting == "uniform":
        sums_RH, weight_R = out_RH / probs_R.unsqueeze(-1), torch.ones_like(probs_R)
    elif weighting == "router":
        sums_RH, weight_R = out_RH, probs_R
    else:
        raise ValueError(f"ema_weighting must be one of {EMA_WEIGHTINGS}, got {weighting!r}")
    if not count_rows:
        weight_R = torch.zeros_like(weight_R)
    stats_EH1.index_add_(0, expert_ids_R, torch.cat([sums_RH, weight_R.unsqueeze(-1)], dim=-1))
    return stats_EH1


def ema_update_(defaults_EH: torch.Tensor, stats_EH1: torch.Tensor, beta: float):
    """In place ``Ê ← β Ê + (1-β) mean`` for experts with tokens and finite statistics.

    Returns ``(updated_E, nonfinite_E)`` boolean masks. Experts with no tokens, or whose statistics
    hold a NaN/Inf (a loss spike), keep their vector.
    """
    sums_EH, counts_E = stats_EH1[:, :-1], stats_EH1[:, -1]
    finite_E = torch.isfinite(stats_EH1).all(dim=-1)
    has_tokens_E = counts_E > 0
    updated_E = has_tokens_E & finite_E
    means_EH = sums_EH / counts_E.clamp_min(torch.finfo(counts_E.dtype).tiny).unsqueeze(-1)
    new_EH = beta * defaults_EH + (1.0 - beta) * means_EH
    defaults_EH.copy_(torch.where(updated_E.unsqueeze(-1), new_EH, defaults_EH))
    return updated_E, has_tokens_E & ~finite_E


def default_term_TH(weights_TE: torch.Tensor, defaults_snapshot_EH: torch.Tensor) -> torch.Tensor:
    """``Σ_{i∉A_t} π_{t,i} sg(Ê_i)``: gradient reaches the router weights, never ``Ê``."""
    return weights_TE @ defaults_snapshot_EH.detach()


def add_default_term(y_TH: torch.Tensor, term_TH: torch.Tensor, mode: str) -> torch.Tensor:
    """Add the default term in ``forward`` mode, or only its gradient in ``backward-only`` mode."""
    term_TH = term_TH.to(y_TH.dtype)
    if mode == "forward":
        return y_TH + term_TH
    if mode == "backward-only":
        return y_TH + (term_TH - term_TH.detach())
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
