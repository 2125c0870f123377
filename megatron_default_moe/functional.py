"""The Default MoE math, free of Megatron (paper arXiv 2504.12463, Eq. 11 and §3).

Shapes are in the names: ``T`` tokens, ``E`` experts, ``H`` hidden, ``R`` rows the local experts
processed (token-expert pairs, padding rows included).

One rule covers every Megatron router (``DESIGN.md`` §1.6). Megatron gives a selected expert the
prob ``p_i = c·f_i/N`` and every other pair 0, with ``f`` the router score (full softmax, or the
*unbiased* sigmoid / sqrt-softplus score), ``N = 1`` or the sum ``S_A`` of ``f`` over the token's
pre-drop top-K, and ``c`` the top-k scaling factor. Forward of one layer, as the glue wires it:

1. ``default_weights_TE``: ``w = c·f / sg(N)`` on every pair whose prob is zero (not routed,
   dropped by a capacity factor, padding). Gradient flows into ``f``.
2. ``expert_output_stats_EH1``: per expert, the sum of unweighted outputs ``o = out / p`` and a count
   (``uniform``), or the sum of router-weighted outputs ``p * o = out`` and ``Σ p`` (``router``).
3. ``ema_update_``: ``Ê_i ← β Ê_i + (1-β) sum_i / count_i`` for experts with ``count_i > 0`` and
   finite statistics.
4. ``default_term_TH``: ``w @ sg(Ê)``, added to the TopK output (``forward`` mode: only where the
   mixture mass stays ``c``, softmax with pre-softmax), or added with its value removed
   (``backward-only``: gradient only; the forward is the stock layer's).
"""

from typing import Sequence, Union

import torch

EMA_WEIGHTINGS = ("uniform", "router")
MODES = ("auto", "forward", "backward-only")
SCORE_FUNCTIONS = ("softmax", "sigmoid", "sqrtsoftplus")
SIGMOID_EPS = 1e-20  # Megatron's epsilon in the sigmoid / sqrt-softplus normaliser


def renormalises(score_function: str, pre_softmax: bool, topk: int) -> bool:
    """Whether Megatron divides the selected scores by their sum ``S_A`` (``N = S_A``).

    Softmax with pre-softmax keeps the raw full-softmax values; softmax after top-k is a softmax
    over the selected logits, i.e. ``π_i / S_A``; sigmoid and sqrt-softplus renormalise for K > 1.
    """
    if score_function == "softmax":
        return not pre_softmax
    return topk > 1


def forward_mode_allowed(score_function: str, pre_softmax: bool) -> bool:
    """The default term may enter the forward only where the mixture mass stays ``c``.

    With a renormalised router the selected probs already sum to ``c`` and the term would inflate
    the mass to ``c / S_A``; sigmoid top-1 has an unbounded default mass ``c·Σ s``.
    """
    return score_function == "softmax" and bool(pre_softmax)


def router_scores_TE(logits_TE: torch.Tensor, score_function: str) -> torch.Tensor:
    """Megatron's unbiased router score ``f`` of every pair, fp32 (differentiable in the logits)."""
    z_TE = logits_TE.float()
    if score_function == "softmax":
        return torch.softmax(z_TE, dim=-1)
    if score_function == "sigmoid":
        return torch.sigmoid(z_TE)
    if score_function == "sqrtsoftplus":
        return torch.nn.functional.softplus(z_TE).sqrt()
    raise ValueError(f"score function must be one of {SCORE_FUNCTIONS}, got {score_function!r}")


def default_weights_TE(
    scores_TE: torch.Tensor,
    probs_TE: torch.Tensor,
    selected_TE: torch.Tensor = None,
    scale: float = 1.0,
    renormalise: bool = False,
    eps: float = 0.0,
) -> torch.Tensor:
    """``w = c·f / sg(N)`` where the TopK probs are 0, else 0 (fp32, differentiable in ``f``).

    ``N`` is 1, or (``renormalise``) ``Σ f + eps`` over ``selected_TE``, the pre-drop top-K set.
    A dropped pair so gets exactly the prob it lost. ``N`` is detached (DenseMixer's rule), so
    selected experts' router gradients keep their stock form.
    """
    weights_TE = scores_TE * scale
    if renormalise:
        norm_T1 = (scores_TE.detach() * selected_TE).sum(dim=-1, keepdim=True) + eps
        weights_TE = weights_TE / norm_T1
    return weights_TE * (probs_TE.detach() == 0)


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
    """``Σ_{i∈D_t} w_{t,i} sg(Ê_i)``: gradient reaches the router weights, never ``Ê``."""
    return weights_TE @ defaults_snapshot_EH.detach()


def add_default_term(y_TH: torch.Tensor, term_TH: torch.Tensor, mode: str) -> torch.Tensor:
    """Add the default term in ``forward`` mode, or only its gradient in ``backward-only`` mode
    (``auto`` must be resolved to one of those by the caller, see ``DefaultMoEConfig``)."""
    term_TH = term_TH.to(y_TH.dtype)
    if mode == "forward":
        return y_TH + term_TH
    if mode == "backward-only":
        return y_TH + (term_TH - term_TH.detach())
    raise ValueError(f"mode must be 'forward' or 'backward-only' here, got {mode!r}")
