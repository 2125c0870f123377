"""How good are the default vectors? Their own statistics, and their distance to what they stand in for.

``default_vector_stats`` describes the table alone (norms, mean pairwise cosine: logged at
``--log-interval``). ``expert_output_moments`` runs every local expert on every token of one batch
and returns, per expert, the mean of its output over the tokens that did not choose it (the
quantity the default term stands in for, ``DESIGN.md`` §1.7) and over those that did (what a
chosen-token EMA tracks); ``default_vector_bias`` turns them into distances in units of the spread.
"""

from typing import Callable, Dict

import torch

from megatron_default_moe.analysis.diagnostics import _eval_mode, _layer_key, _patched, moe_layers
from megatron_default_moe.layer import DefaultMoELayer, _group_size


def default_vector_stats(defaults_EH: torch.Tensor) -> Dict[str, float]:
    """Norms of the default vectors and their mean pairwise cosine (over the non-zero ones)."""
    d_EH = defaults_EH.detach().double()
    norms_E = d_EH.norm(dim=-1)
    nonzero_E = norms_E > 0
    unit = d_EH[nonzero_E] / norms_E[nonzero_E].unsqueeze(-1)
    n = unit.shape[0]
    pairwise = ((unit @ unit.T).sum() - n) / (n * (n - 1)) if n > 1 else torch.tensor(float("nan"))
    return {
        "experts": int(d_EH.shape[0]),
        "nonzero": int(nonzero_E.sum()),
        "mean_norm": float(norms_E.mean()),
        "min_norm": float(norms_E.min()),
        "max_norm": float(norms_E.max()),
        "mean_pairwise_cosine": float(pairwise),
    }


def _gather_rows(x_TC: torch.Tensor, group) -> torch.Tensor:
    """Rows of ``x`` from every rank of ``group`` (uneven row counts allowed: pad, gather, trim)."""
    if _group_size(group) == 1:
        return x_TC
    size = torch.tensor([x_TC.shape[0]], dtype=torch.long, device=x_TC.device)
    sizes = [torch.zeros_like(size) for _ in range(_group_size(group))]
    torch.distributed.all_gather(sizes, size, group=group)
    rows = max(int(s) for s in sizes)
    padded = x_TC.new_zeros((rows,) + tuple(x_TC.shape[1:]))
    padded[: x_TC.shape[0]] = x_TC
    parts = [torch.zeros_like(padded) for _ in sizes]
    torch.distributed.all_gather(parts, padded, group=group)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)])


def expert_output_moments(model, forward_fn: Callable) -> Dict[int, Dict[str, torch.Tensor]]:
    """Per Default MoE layer, each expert's outputs ``E_i(x)`` on the tokens that did not choose it
    and on those that did: ``{layer: {"unchosen_mean", "unchosen_sq", "unchosen_count",
    "chosen_mean", "chosen_count", "default_vectors"}}`` (``[N, H]`` / ``[N]`` fp64).

    ``forward_fn(model)`` runs one forward (eval mode, no grad). Each MoE layer's input tokens and
    TopK selection are recorded, gathered over the stage (``tp_dp_cp``), and every rank runs its
    local experts on all of them (as the dense diagnostic does). Sums are all-reduced, so every rank
    returns the same global numbers; experts replicated over expert-data-parallel ranks count every
    token once per replica, which leaves means and second moments unchanged. Expert-tensor-parallel
    outputs are partial sums: not supported.
    """
    layers = [layer for layer in moe_layers(model) if isinstance(layer, DefaultMoELayer)]
    seen = {}

    def recording_route(layer):
        route = layer.route

        def route_and_record(hidden_states, *args, **kwargs):
            probs, routing_map = route(hidden_states, *args, **kwargs)
            seen[id(layer)] = (hidden_states.detach().reshape(-1, hidden_states.shape[-1]), routing_map.detach())
            return probs, routing_map

        return route_and_record

    for layer in layers:
        if _group_size(layer.token_dispatcher.tp_group) > 1:
            raise ValueError("expert_output_moments: expert tensor parallelism is not supported")
    with _eval_mode(model), _patched([(layer, "route", recording_route(layer)) for layer in layers]), torch.no_grad():
        forward_fn(model)
    out = {}
    for i, layer in enumerate(layers):
        x_TH, selected_TE = seen[id(layer)]
        group = getattr(layer.router, "tp_dp_cp_group", None)
        x_TH, selected_TE = _gather_rows(x_TH, group), _gather_rows(selected_TE.to(torch.uint8), group).bool()
        n, h, t = layer.config.num_moe_experts, x_TH.shape[-1], x_TH.shape[0]
        local = list(layer.local_expert_indices)
        tokens_per_expert = torch.full((len(local),), t, dtype=torch.long)
        o_LTH, _ = layer.experts(x_TH.repeat(len(local), 1), tokens_per_expert, x_TH.new_ones(len(local) * t))
        o_LTH = o_LTH.double().view(len(local), t, h)
        table = torch.zeros(n, 3 * h + 2, dtype=torch.float64, device=x_TH.device)  # [Σu | Σ|u|² | Σc | #u | #c]
        for j, e in enumerate(local):
            unchosen_T = ~selected_TE[:, e]
            o_TH = o_LTH[j]
            table[e, :h] = o_TH[unchosen_T].sum(0)
            table[e, h : 2 * h] = o_TH[unchosen_T].pow(2).sum(0)
            table[e, 2 * h : 3 * h] = o_TH[~unchosen_T].sum(0)
            table[e, 3 * h] = unchosen_T.sum()
            table[e, 3 * h + 1] = (~unchosen_T).sum()
        if _group_size(group) > 1:
            torch.distributed.all_reduce(table, group=group)
        nu, nc = table[:, 3 * h], table[:, 3 * h + 1]
        out[_layer_key(layer, i)] = {
            "unchosen_mean": table[:, :h] / nu.clamp_min(1).unsqueeze(-1),
            "unchosen_sq": table[:, h : 2 * h] / nu.clamp_min(1).unsqueeze(-1),
            "unchosen_count": nu,
            "chosen_mean": table[:, 2 * h : 3 * h] / nc.clamp_min(1).unsqueeze(-1),
            "chosen_count": nc,
            "default_vectors": layer.default_vectors.detach().double().clone(),
        }
    return out


def default_vector_bias(model, forward_fn: Callable) -> Dict[int, Dict[str, float]]:
    """How far each default vector ``Ê_i`` is from what it stands in for, per Default MoE layer.

    For expert i, ``u_i`` = mean of ``E_i(x)`` over the tokens that did **not** choose i (the
    tokens whose default term uses ``Ê_i``), ``s_i`` = their spread (RMS distance to ``u_i``),
    ``c_i`` = the mean over the tokens that did choose i (what a chosen-token EMA tracks). Means
    over the experts with both kinds of tokens and a non-zero ``Ê_i``:

    - ``bias``: ``‖Ê_i − u_i‖ / s_i`` (the systematic error of the constant stand-in, in units of
      the spread no constant can remove; below 1 a better constant would gain little);
    - ``selection_gap``: ``‖c_i − u_i‖ / s_i`` (the bias even an exact chosen-token mean has);
    - ``lag``: ``‖Ê_i − c_i‖ / s_i`` (the EMA's distance to the current chosen-token mean);
    - ``cosine``: ``cos(Ê_i, u_i)``; ``norm_ratio``: ``‖Ê_i‖ / ‖u_i‖``; ``experts``: how many counted.
    """
    out = {}
    for key, m in expert_output_moments(model, forward_fn).items():
        u_NH, c_NH, d_NH = m["unchosen_mean"], m["chosen_mean"], m["default_vectors"]
        spread_N = (m["unchosen_sq"] - u_NH.pow(2)).sum(-1).clamp_min(0).sqrt()
        ok_N = (m["unchosen_count"] > 0) & (m["chosen_count"] > 0) & (d_NH.norm(dim=-1) > 0) & (spread_N > 0)
        if not ok_N.any():
            out[key] = {k: float("nan") for k in ("bias", "selection_gap", "lag", "cosine", "norm_ratio")}
            out[key]["experts"] = 0
            continue
        u, c, d, s = u_NH[ok_N], c_NH[ok_N], d_NH[ok_N], spread_N[ok_N]
        out[key] = {
            "bias": float(((d - u).norm(dim=-1) / s).mean()),
            "selection_gap": float(((c - u).norm(dim=-1) / s).mean()),
            "lag": float(((d - c).norm(dim=-1) / s).mean()),
            "cosine": float(torch.nn.functional.cosine_similarity(d, u, dim=-1).mean()),
            "norm_ratio": float((d.norm(dim=-1) / u.norm(dim=-1).clamp_min(1e-30)).mean()),
            "experts": int(ok_N.sum()),
        }
    return out
