"""How far could richer default vectors go? Oracle ceilings of the default term (``DESIGN.md`` §1.7).

The default term stands in ``V_{t,i}`` for ``E_i(x_t)`` on the pairs token t did not select;
today ``V_{t,i} = Ê_i``, one vector per expert. Each candidate below sets ``V`` from the exact
outputs of every expert on every token of a *fitting* batch, then measures on another batch the
router-gradient cosine to dense of the model with that ``V`` in the term:

- ``constant``: ``u_i``, the unchosen mean (the best one vector per expert can be expected to do);
- ``top1``: ``u_{i,j}``, expert i's unchosen mean over the tokens whose top-1 expert is j;
- ``linear-r``: ``u_i + (x_t − x̄_i) B_i``, ``B_i`` the rank-r least-squares map fitted on the
  tokens that did not choose i;
- ``exact``: ``E_i(x_t)`` on the measured batch itself: the dense gradient, so its cosine is 1 up
  to rounding (a check of this module's plumbing, not a candidate).

``oracle_fits.shrink_ceiling`` adds the cheapest candidate, the term scaled by ``α ∈ [0, 1]``
(``α = 0`` is TopK), from the Gram matrix of the three router gradients. The fits live in
``oracle_fits`` (pure math); this module is the Megatron glue. One rank, or EP over data-parallel ranks;
expert tensor parallelism is not supported (its outputs are partial sums).
"""

import contextlib
import functools
from typing import Callable, Dict

import torch

from megatron_default_moe import functional as F
from megatron_default_moe.analysis.diagnostics import _eval_mode, _layer_key, _patched, moe_layers, router_gradient_triples
from megatron_default_moe.layer import DefaultMoELayer, _group_rank, _group_size
from megatron_default_moe.analysis.oracle_fits import CANDIDATES, candidate_vectors_TEH, fit_candidates, gram_of
from megatron_default_moe.analysis.vector_quality import _gather_rows

def record_routing(model, forward_fn: Callable):
    """Per Default MoE layer: ``(x_NH, routed_NE, top1_N, mine)`` of one forward (eval, no grad),
    gathered over the stage (``tp_dp_cp``): every rank holds all N tokens; ``mine`` is the slice
    of this rank's own."""
    layers = [m for m in model.modules() if isinstance(m, DefaultMoELayer)]
    seen = {}

    def recording(layer):
        route = layer.route

        def route_and_record(hidden_states, *args, **kwargs):
            probs, routing_map = route(hidden_states, *args, **kwargs)
            seen[id(layer)] = (hidden_states.detach().reshape(-1, hidden_states.shape[-1]), routing_map, probs)
            return probs, routing_map

        return route_and_record

    with _eval_mode(model), _patched([(layer, "route", recording(layer)) for layer in layers]), torch.no_grad():
        forward_fn(model)
    out = {}
    for layer in layers:
        if _group_size(layer.token_dispatcher.tp_group) > 1:
            raise ValueError("default_oracles: expert tensor parallelism is not supported")
        x_TH, routed_TE, probs_TE = seen[id(layer)]
        group = getattr(layer.router, "tp_dp_cp_group", None)
        top1_T = probs_TE.float().masked_fill(~routed_TE, -1.0).argmax(-1)
        x_NH = _gather_rows(x_TH, group)
        routed_NE = _gather_rows(routed_TE.to(torch.uint8), group).bool()
        if x_NH.shape[0] != x_TH.shape[0] * _group_size(group):
            raise ValueError("default_oracles: ranks hold different token counts")
        first = _group_rank(group) * x_TH.shape[0]
        out[layer] = (x_NH, routed_NE, _gather_rows(top1_T, group), slice(first, first + x_TH.shape[0]))
    return out


def expert_outputs_ENH(layer, x_NH) -> torch.Tensor:
    """``E_i(x_n)`` of every expert on every token, fp64 ``[E, N, H]`` on every rank (local experts
    run here, the table summed over the expert-parallel group)."""
    local = list(layer.local_expert_indices)
    n, h = x_NH.shape
    counts = torch.full((len(local),), n, dtype=torch.long)
    with torch.no_grad():
        o_LNH, _ = layer.experts(x_NH.repeat(len(local), 1), counts, x_NH.new_ones(len(local) * n))
    table = torch.zeros(layer.config.num_moe_experts, n, h, dtype=torch.float64, device=x_NH.device)
    table[local] = o_LNH.double().view(len(local), n, h)
    group = layer.token_dispatcher.ep_group
    if _group_size(group) > 1:
        torch.distributed.all_reduce(table, group=group)
    return table


class _TokenDefaultTerm(torch.autograd.Function):
    """``_DefaultTerm`` with a vector per (token, expert): ``y + Σ_i w_{t,i} V_{t,i}`` (forward
    mode) or ``y``; backward ``dL/dw_{t,i} = ⟨dL/dy_t, V_{t,i}⟩`` to the sink or to ``w``."""

    @staticmethod
    def forward(ctx, y_TH, weights_TE, v_TEH, add_to_forward, grad_sink, after):
        ctx.save_for_backward(v_TEH)
        ctx.grad_sink, ctx.weights_dtype = grad_sink, None if weights_TE is None else weights_TE.dtype
        if add_to_forward:
            return y_TH + torch.einsum("te,teh->th", weights_TE.double(), v_TEH).to(y_TH.dtype)
        return y_TH

    @staticmethod
    def backward(ctx, grad_TH):
        (v_TEH,) = ctx.saved_tensors
        grad_w_TE = torch.einsum("th,teh->te", grad_TH.double(), v_TEH).float()
        if ctx.grad_sink is not None:
            ctx.grad_sink(grad_w_TE)
            grad_w_TE = None
        elif ctx.needs_input_grad[1]:
            grad_w_TE = grad_w_TE.to(ctx.weights_dtype)
        else:
            grad_w_TE = None
        return grad_TH, grad_w_TE, None, None, None, None


def _token_term(v_TEH, y_TH, weights_TE, defaults_EH, mode, grad_sink=None, after=None, coordinates=None):
    """``add_default_term`` with ``V_TEH`` for the layer's whole default (a ``shared-1`` line too)."""
    return _TokenDefaultTerm.apply(y_TH, weights_TE, v_TEH, mode == "forward", grad_sink, after)


@contextlib.contextmanager
def token_defaults(vectors):
    """``{layer: V_TEH}``: those layers' default term uses ``V`` (their vectors hold ones as a
    marker; while ``_topk_routing`` zeroes them the layer is stock TopK again)."""
    changes, saved = [], []
    for layer, v_TEH in vectors.items():
        original = layer.postprocess

        def postprocess(output, shared, _layer=layer, _original=original, _v=v_TEH):
            if not bool(_layer.default_vectors.any()):
                return _original(output, shared)
            with _patched([(F, "add_default_term", functools.partial(_token_term, _v))]):
                return _original(output, shared)

        changes.append((layer, "postprocess", postprocess))
        saved.append((layer, layer.default_vectors.clone()))
        layer.default_vectors.fill_(1.0)
    try:
        with _patched(changes):
            yield
    finally:
        for layer, v in saved:
            layer.default_vectors.copy_(v)


def richer_default_ceilings(model, loss_fn: Callable, forward_fit: Callable, forward_measure: Callable,
                            candidates=CANDIDATES) -> Dict[str, Dict[int, Dict[str, float]]]:  # fmt: skip
    """``{candidate: {layer: gram_of(T, D, G)}}``: every Default MoE layer's term set to the
    candidate (fitted on ``forward_fit``'s batch, measured on ``loss_fn``'s, which must be
    ``forward_measure``'s batch), and the layer's TopK, as-built and dense router gradients."""
    fits = {}
    for layer, (x_NH, routed_NE, top1_N, _) in record_routing(model, forward_fit).items():
        fits[layer] = fit_candidates(x_NH, routed_NE, top1_N, expert_outputs_ENH(layer, x_NH))
    measured = record_routing(model, forward_measure)
    exact = {layer: expert_outputs_ENH(layer, x_NH)[:, mine] for layer, (x_NH, _, _, mine) in measured.items()}
    out = {}
    for name in candidates:
        vectors, errors = {}, {}
        for layer, (x_NH, routed_NE, top1_N, mine) in measured.items():
            v = candidate_vectors_TEH(name, fits[layer], x_NH[mine], top1_N[mine], exact[layer]).contiguous()
            vectors[layer] = v
            constant = candidate_vectors_TEH("constant", fits[layer], x_NH[mine], top1_N[mine])
            errors[layer] = _fit_error(v, constant, exact[layer].transpose(0, 1), ~routed_NE[mine])
        with token_defaults(vectors):
            triples = router_gradient_triples(model, loss_fn)
        layer_keys = {id(layer): _layer_key(layer, i) for i, layer in enumerate(moe_layers(model))}
        out[name] = {k: gram_of(t, d, g) for k, (t, d, g) in triples.items() if d is not None}
        for layer, err in errors.items():
            out[name][layer_keys[id(layer)]]["fit_error"] = err
    return out


def _fit_error(v_TEH, constant_TEH, exact_TEH, unchosen_TE):
    """``‖V − E(x)‖ / ‖u − E(x)‖`` over the unchosen pairs (the constant candidate: 1)."""
    m = unchosen_TE.unsqueeze(-1)
    return float(((v_TEH - exact_TEH) * m).norm() / ((constant_TEH - exact_TEH) * m).norm().clamp_min(1e-300))
