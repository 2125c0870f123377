"""The probes' (``estimators/probes.py``) two hot steps as ops: the draw, and the exclusion of the probe rows.

Unfused, the draw is ~80 small torch kernels per layer and micro-batch (the key hash alone is
~40) and the exclusion ~20, about 0.4 ms of launches on a GPU. Each op is one Triton kernel on
CUDA (``ops/kernels/probes.py``) and the reference below elsewhere (pure torch, no Megatron):

- ``probe_draw``: which (token, expert) pairs a micro-batch's probes take; the kernel draws the
  same pairs bit for bit on uniform draws (weighted draws: the same pairs unless a key falls
  within fp32 rounding of a boundary between two experts' shares, and ``W_t`` summed in another
  order);
- ``probe_exclude``: on the expert rank, the probe rows' per-expert statistics, and those rows
  zeroed in place (only they are touched); the kernel sums in another order (fp32 rounding);
- ``probe_zero``: the same rows of the gradient zeroed in place, in the backward.

The draw is a pure function of its inputs: a counter-based integer hash of ``(seed, index)`` for
the keys (no generator state: the same bits on any device and under fake tensors), keyed by the
strata's global ids (``ops/strata.py``), so any layout of the global batch draws the same pairs.
"""

from typing import Optional

import torch

PROBE_PROB = -1.0  # a uniform draw's probe; a weighted draw's carries -W_t (its importance weight)
PROBE_DRAWS = ("uniform", "weighted")


def probe_seed(seed: int, counter: int, layer_number: int, token_set: int) -> int:
    """One 63-bit seed per (seed, micro-batch counter, layer, set of tokens) (splitmix64 steps)."""
    x = 0
    for part in (seed, counter, layer_number or 0, token_set):
        x = (x ^ (part & 0xFFFFFFFFFFFFFFFF)) + 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


_M32 = 0xFFFFFFFF


def _mul32(h, c: int):
    """``h * c mod 2^32`` for ``0 <= h < 2^32`` in int64 without overflow (16-bit halves of ``c``)."""
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _fmix32(h):
    """MurmurHash3's finaliser: every input bit moves every output bit."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def uniform_keys(numel: int, seed: int, device) -> torch.Tensor:
    """``numel`` uniforms in (0, 1), fp32, a pure function of ``seed`` (a ``probe_seed``) and the
    index: the same values on every device and under fake tensors."""
    index = torch.arange(numel, device=device, dtype=torch.int64)
    h = _fmix32((index ^ (seed & _M32)) & _M32)
    h = _fmix32(h ^ ((seed >> 32) & _M32))
    return (h.to(torch.float64) + 0.5).mul_(2.0**-32).to(torch.float32)


def hashed_keys(x: torch.Tensor, seed: int) -> torch.Tensor:
    """A uint32 hash (in int64) of each non-negative int64 of ``x`` and the 63-bit ``seed``."""
    h = _fmix32((x & _M32) ^ (seed & _M32))
    return _fmix32(h ^ ((x >> 32) & _M32) ^ ((seed >> 32) & _M32))


def probe_draw_reference(weights_TE: torch.Tensor, routing_map_TE: torch.Tensor, strata_B4: torch.Tensor, m: int,
                         stride: int, seed: int, weighted: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(tokens_B, experts_B, probs_B)`` (int64, int64, fp32) of ``draw_probes``: one pair per
    stratum of ``strata_B4`` (``ops/strata.py``'s ``(id, base, lo, hi)``, int64), strata of ``m``
    positions ``stride`` tokens apart. ``weights_TE``: weighted, the default weights ``w``;
    uniform, the pairs blocked besides the routed ones (bool: padding tokens' rows), so ``w`` is
    not needed."""
    experts = weights_TE.shape[1]
    id_B, base_B, lo_B, hi_B = strata_B4.unbind(1)
    off_B = (hashed_keys(2 * id_B, seed) * m) >> 32  # the stratum's position, uniform over its m
    mine_B = (off_B >= lo_B) & (off_B < hi_B)  # else on another rank: a filler here
    tokens_B = base_B + torch.minimum(torch.maximum(off_B, lo_B), hi_B - 1) * stride
    routed_BE = routing_map_TE.index_select(0, tokens_B)
    if weighted:
        w_BE = weights_TE.index_select(0, tokens_B).float().masked_fill_(routed_BE, 0.0)
        mass_BE = w_BE
    else:
        mass_BE = (~(routed_BE | (weights_TE.index_select(0, tokens_B) != 0))).float()
    cdf_BE = mass_BE.cumsum(-1)
    total_B1 = cdf_BE[:, -1:]
    key_B = ((hashed_keys(2 * id_B + 1, seed).to(torch.float64) + 0.5) * 2.0**-32).to(torch.float32)
    target_B1 = key_B[:, None] * total_B1
    last_B = experts - 1 - (mass_BE > 0).flip(-1).int().argmax(-1)  # the last eligible expert
    picked_B = torch.minimum((cdf_BE <= target_B1).sum(-1), last_B)
    eligible_B = (total_B1.squeeze(-1) > 0) & mine_B
    experts_B = torch.where(eligible_B, picked_B, (~routed_BE).int().argmax(-1).long())
    weight_B = mass_BE.sum(-1) if weighted else torch.ones_like(key_B)
    return tokens_B, experts_B, torch.where(eligible_B, -weight_B, 0.0)


probe_draw = torch.library.custom_op("default_moe::probe_draw", mutates_args=())(probe_draw_reference)


@probe_draw.register_fake
def _(weights_TE, routing_map_TE, strata_B4, m, stride, seed, weighted):
    new, budget = weights_TE.new_empty, strata_B4.shape[0]
    return new(budget, dtype=torch.int64), new(budget, dtype=torch.int64), new(budget, dtype=torch.float32)


def draw_probes(weights_TE, routing_map_TE, strata_B4, m: int, stride: int, seed: int, draw: str):
    """``(tokens_B, experts_B, probs_B)``: one unrouted pair per stratum (``ops/strata.py``).

    Each stratum takes one of its ``m`` positions (each equally likely) and that token one of its
    unrouted experts with ``w > 0``: ``uniform``: alike (every eligible pair then equally likely;
    prob ``PROBE_PROB``); ``weighted``: in proportion to ``w``, with prob ``-W_t`` (``W_t = Σ w``
    of the token's unrouted experts) so that the statistics, weighting each row by ``|p|``,
    estimate the ``w``-weighted unchosen mean. Both keys hash the stratum's global id with
    ``seed``: the same pairs under any layout of the global batch. A stratum whose token is on
    another rank, or has no eligible pair (padding), gets a filler: an unrouted pair of one of its
    tokens here, prob 0 (one exists: probes need top-k below the expert count,
    ``unsupported.probe_conflict``), run like Megatron's own padding rows and never counted.
    Distinct strata hold distinct tokens, so the pairs are distinct. Work: ``O(B · E)`` in one
    op, no host sync. ``weights_TE``: ``w`` for weighted draws; for uniform ones a bool of the
    pairs with weight 0 (the router's chosen pairs and padding tokens), so that ``w`` itself is
    not computed.
    """
    if draw not in PROBE_DRAWS:
        raise ValueError(f"--moe-default-probe-draw must be one of {PROBE_DRAWS}, got {draw!r}")
    return probe_draw(weights_TE.detach(), routing_map_TE, strata_B4, int(m), int(stride), int(seed),
                      draw == "weighted")  # fmt: skip


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
