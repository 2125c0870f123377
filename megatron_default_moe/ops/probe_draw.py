"""The probes' draw as ops, on the token's rank (``estimators/probes.py``); their exclusion on the
expert rank is ``ops/probes.py``.

Unfused, the draw is ~80 small torch kernels per layer and micro-batch (the key hash alone is
~40). Each op is one Triton kernel on CUDA (``ops/kernels/probes.py``) and the reference below
elsewhere (pure torch, no Megatron):

- ``probe_draw``: which (token, expert) pairs a micro-batch's probes take; the kernel draws the
  same pairs bit for bit on uniform draws (weighted draws: the same pairs unless a key falls
  within fp32 rounding of a boundary between two experts' shares, and ``W_t`` summed in another
  order);
- ``probe_add``: the draw and its pairs written into copies of the probs and routing map, what
  the layer runs (one kernel, where a draw and two ``index_put`` were three).

The draw is a pure function of its inputs: a counter-based integer hash of ``(seed, index)`` for
the keys (no generator state: the same bits on any device and under fake tensors), keyed by the
strata's global ids (``ops/strata.py``), so any layout of the global batch draws the same pairs.
"""

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


def probe_add_reference(probs_TE: torch.Tensor, routing_map_TE: torch.Tensor, weights_TE: torch.Tensor,
                        strata_B4: torch.Tensor, m: int, stride: int, seed: int,
                        weighted: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The draw and its pairs routed, in one op: ``(probs_TE, routing_map_TE)`` copied with each
    drawn pair set (its prob, fillers' 0, and True), and the draw's ``(tokens_B, experts_B,
    probs_B)`` (``probe_draw_reference``). The kernel copies each stratum's token rows where it
    draws the stratum's pair: the strata hold every token row once (``ops/strata.py``), and a
    stratum's pair is one of its own rows."""
    tokens_B, experts_B, probs_B = probe_draw_reference(weights_TE, routing_map_TE, strata_B4, m, stride, seed,
                                                        weighted)  # fmt: skip
    pair = (tokens_B, experts_B)
    probs = probs_TE.index_put(pair, probs_B.to(probs_TE.dtype))
    routed = routing_map_TE.index_put(pair, torch.ones_like(tokens_B, dtype=torch.bool))
    return probs, routed, tokens_B, experts_B, probs_B


probe_add = torch.library.custom_op("default_moe::probe_add", mutates_args=())(probe_add_reference)


@probe_add.register_fake
def _(probs_TE, routing_map_TE, weights_TE, strata_B4, m, stride, seed, weighted):
    new, budget = weights_TE.new_empty, strata_B4.shape[0]
    return (torch.empty_like(probs_TE), torch.empty_like(routing_map_TE), new(budget, dtype=torch.int64),
            new(budget, dtype=torch.int64), new(budget, dtype=torch.float32))  # fmt: skip


class _ProbesAdded(torch.autograd.Function):
    """``probe_add`` in autograd: the probs' gradient passes through unchanged (at a probe pair it
    is the expert's, 0: its output row's gradient is zeroed; and Megatron's router reads only its
    selected pairs' gradient, a scatter's backward), so no ``[T, E]`` pass is spent on zeroing it;
    the other outputs are not differentiable (no gradient is materialised for them)."""

    @staticmethod
    def forward(ctx, probs_TE, *args):
        probs, routed, tokens_B, experts_B, probs_B = probe_add(probs_TE, *args)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(routed, tokens_B, experts_B, probs_B)
        return probs, routed, tokens_B, experts_B, probs_B

    @staticmethod
    def backward(ctx, grad_probs_TE, *_):
        return (grad_probs_TE,) + (None,) * 7


def add_probes(probs_TE, routing_map_TE, weights_TE, strata_B4, m: int, stride: int, seed: int, draw: str):
    """``(probs, routing_map, (tokens_B, experts_B, probs_B))``: ``draw_probes``' pairs routed, the
    probs with their (constant) probe probs: the router's gradient at those pairs stays the stock
    one, zero. One op (one kernel on CUDA) for the draw and both copies."""
    if draw not in PROBE_DRAWS:
        raise ValueError(f"--moe-default-probe-draw must be one of {PROBE_DRAWS}, got {draw!r}")
    probs, routed, *pairs = _ProbesAdded.apply(probs_TE, routing_map_TE, weights_TE.detach(), strata_B4, int(m),
                                               int(stride), int(seed), draw == "weighted")  # fmt: skip
    return probs, routed, tuple(pairs)
