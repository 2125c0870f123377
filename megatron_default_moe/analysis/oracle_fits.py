"""The pure math of the richer-default oracles (``default_oracles``): fits of ``V_{t,i}`` from
exact expert outputs, and the shrink toward TopK scored from a Gram matrix. No Megatron import.

Costs (``candidate_cost``) are per token and layer against the routed experts' own GEMMs, forward
and backward: the term reads ``V`` once forward and forms ``dL/dw = dL/dy · V`` backward.
"""

from typing import Dict

import torch

CANDIDATES = ("constant", "top1", "shared-1", "shared-4", "linear-4", "linear-16", "exact")


def _masked_mean(o_ENH, mask_EN):
    m = mask_EN.double().unsqueeze(-1)
    return (o_ENH * m).sum(1) / m.sum(1).clamp_min(1.0)


def fit_candidates(x_NH, routed_NE, top1_N, o_ENH, ranks=(4, 16), shared_ranks=(1, 4), ridge=1e-3):
    """The candidates' parameters fitted on one batch's unchosen pairs (fp64): ``linear-r`` a
    rank-r map per expert (reduced-rank regression); ``shared-r`` the input projected on the r
    leading principal directions of all tokens (one basis for every expert), then a per-expert
    least-squares map from those r coordinates."""
    unchosen_EN = ~routed_NE.T
    u_EH = _masked_mean(o_ENH, unchosen_EN)
    e, n, h = o_ENH.shape
    cell_sum = torch.zeros(e, e, h, dtype=torch.float64, device=o_ENH.device)  # [expert, top-1, H]
    cell_count = torch.zeros(e, e, dtype=torch.float64, device=o_ENH.device)
    for i in range(e):
        rows = unchosen_EN[i]
        cell_sum[i].index_add_(0, top1_N[rows], o_ENH[i][rows])
        cell_count[i].index_add_(0, top1_N[rows], torch.ones_like(top1_N[rows], dtype=torch.float64))
    top1_EEH = torch.where(cell_count.unsqueeze(-1) > 0, cell_sum / cell_count.clamp_min(1).unsqueeze(-1), u_EH[:, None])
    x = x_NH.double()
    xbar_EH = _masked_mean(x.expand(e, n, h), unchosen_EN)
    _, _, basis = torch.linalg.svd(x - x.mean(0), full_matrices=False)  # shared input directions
    maps = {f"linear-{r}": torch.zeros(e, h, h, dtype=torch.float64, device=x.device) for r in ranks}
    maps.update({f"shared-{r}": torch.zeros(e, h, h, dtype=torch.float64, device=x.device) for r in shared_ranks})
    for i in range(e):
        rows = unchosen_EN[i]
        if rows.sum() < 2:
            continue
        xc, yc = x[rows] - xbar_EH[i], o_ENH[i][rows] - u_EH[i]
        b_HH = _ridge(xc, yc, ridge)
        _, _, vt = torch.linalg.svd(xc @ b_HH, full_matrices=False)  # reduced-rank regression
        for r in ranks:
            maps[f"linear-{r}"][i] = b_HH @ vt[:r].T @ vt[:r]
        for r in shared_ranks:
            p_Hr = basis[:r].T
            maps[f"shared-{r}"][i] = p_Hr @ _ridge(xc @ p_Hr, yc, ridge)
    return dict(u_EH=u_EH, top1_EEH=top1_EEH, xbar_EH=xbar_EH, maps=maps)


def _ridge(x_NK, y_NH, ridge):
    gram = x_NK.T @ x_NK
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + ridge * gram.diagonal().mean() * eye, x_NK.T @ y_NH)


def candidate_vectors_TEH(name, fit, x_TH, top1_T, o_ETH=None):
    """``V_{t,i}`` of candidate ``name`` for the measured tokens, ``[T, E, H]`` fp64."""
    u_EH = fit["u_EH"]
    if name == "constant":
        return u_EH.expand(x_TH.shape[0], *u_EH.shape)
    if name == "top1":
        return fit["top1_EEH"][:, top1_T].transpose(0, 1)
    if name in fit["maps"]:
        b_EHH = fit["maps"][name]
        xc_ETH = x_TH.double().unsqueeze(0) - fit["xbar_EH"].unsqueeze(1)
        return (u_EH.unsqueeze(1) + torch.bmm(xc_ETH, b_EHH)).transpose(0, 1)
    if name == "exact":
        return o_ETH.transpose(0, 1)
    raise ValueError(f"unknown candidate {name!r}")


def gram_of(topk, default, dense) -> Dict[str, float]:
    """Dot products of the three flat fp64 router gradients (T, D, G): enough to score any
    ``T + α (D − T)`` afterwards."""
    t, d, g = (v.detach().double().reshape(-1) for v in (topk, default, dense))
    return {"tt": float(t @ t), "td": float(t @ d), "tg": float(t @ g), "dd": float(d @ d), "dg": float(d @ g),
            "gg": float(g @ g)}


def shrunk_cosine(gram, alpha: float) -> float:
    """cos(T + α (D − T), G) from ``gram_of``."""
    a, b = 1.0 - alpha, alpha
    dot = a * gram["tg"] + b * gram["dg"]
    norm2 = a * a * gram["tt"] + 2 * a * b * gram["td"] + b * b * gram["dd"]
    denom = (max(norm2, 0.0) * gram["gg"]) ** 0.5
    return dot / denom if denom > 0 else 0.0


def shrink_ceiling(gram, steps: int = 100):
    """``(best α in [0, 1], its cosine)`` on a grid of ``steps`` + 1 points."""
    return max(((k / steps, shrunk_cosine(gram, k / steps)) for k in range(steps + 1)), key=lambda p: p[1])


def candidate_cost(name, hidden, experts, ffn, topk, glu=True, bytes_per_value=4):
    """``(state bytes per layer, term MACs / expert MACs per token, forward + backward)`` of a
    candidate in backward-only mode (the term's forward is free; the fit's own statistics not
    counted). ``shared-r`` projects ``x`` on one basis for all experts (``H r`` MACs per token)."""
    expert_macs = 3 * topk * (3 if glu else 2) * hidden * ffn  # forward + two backward GEMMs
    if name == "constant":
        state, macs = experts * hidden, experts * hidden
    elif name == "top1":
        state, macs = experts * experts * hidden, experts * hidden  # a gather of E rows per token
    elif name.startswith(("linear-", "shared-")):
        # backward-only: dL/dw_ti = <g, u_i> + ((x - x̄_i) P_i) · (Q_iᵀ g): H MACs + 2 H r
        r = int(name.split("-")[1])
        shared = name.startswith("shared-")
        state = experts * (hidden * r + 2 * hidden) + (hidden * r if shared else experts * hidden * r)
        macs = experts * hidden * (2 * r + 1) - (experts - 1) * hidden * r * shared
    else:
        raise ValueError(f"no cost for {name!r}")
    return state * bytes_per_value, macs / expert_macs
