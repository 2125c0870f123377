"""``DefaultMoERouter``: Megatron's TopK router that also prepares the default term.

The default weights ``w = c·f / sg(N)`` and their logits gradient are fused ops (``ops/ema.py``).
Their gradient meets Megatron's own logits gradient in one op: the router hands Megatron the
logits through ``DefaultLogitGradient`` (an identity), whose backward adds the default term's
share, so autograd never sums two ``[T, E]`` gradients into the logits.
"""

import torch
from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function
from megatron.core.transformer.moe.router import TopKRouter

from megatron_default_moe import functional as F
from megatron_default_moe.compat import expert_bias_padding_mask
from megatron_default_moe.ops import ema as fused


def default_op_inputs(router: TopKRouter, logits_TE, probs_TE, routing_map_TE, normaliser=None, padding_T1=None):
    """``(chosen_TE, selected_TE, options)`` of the fused default-weight ops for any Megatron
    ``TopKRouter``: pairs whose weight is 0 (prob nonzero, or a padding token), the pre-drop top-K
    set ``N`` sums over, and the rule's constants. ``normaliser`` defaults to the router's
    ``default_normaliser`` (``"selected"`` if it has none)."""
    config = router.config
    renormalise = F.renormalises(router.score_function, config.moe_router_pre_softmax, router.topk)
    normaliser = normaliser or getattr(router, "default_normaliser", "selected")
    selected_TE = routing_map_TE
    if renormalise and normaliser == "selected" and config.moe_expert_capacity_factor is not None:
        with torch.no_grad():  # the top-K set before capacity dropping (same bias and groups)
            _, selected_TE = topk_routing_with_score_function(
                logits_TE.detach(),
                router.topk,
                use_pre_softmax=config.moe_router_pre_softmax,
                num_groups=config.moe_router_num_groups,
                group_topk=config.moe_router_group_topk,
                scaling_factor=config.moe_router_topk_scaling_factor,
                score_function=router.score_function,
                expert_bias=router.expert_bias,
                fused=config.moe_router_fusion,
            )
    # where the probs are nonzero: the routing map itself unless a capacity factor drops pairs (or
    # pads with prob-0 pairs); a bool read instead of an fp32 one (a zero prob of a routed pair has
    # f = 0, so its weight is 0 either way)
    chosen_TE = routing_map_TE if config.moe_expert_capacity_factor is None else probs_TE.detach()
    if padding_T1 is not None:
        chosen_TE = (chosen_TE != 0) | padding_T1
    options = (
        router.score_function,
        renormalise,
        normaliser == "all",
        float(config.moe_router_topk_scaling_factor or 1.0),
        F.SIGMOID_EPS if router.score_function != "softmax" else 0.0,
    )
    return chosen_TE, selected_TE, options


def default_weights_of(router: TopKRouter, logits_TE, probs_TE, routing_map_TE, normaliser=None) -> torch.Tensor:
    """``c·f / sg(N)`` where ``probs_TE`` is 0 (fp32, differentiable in the logits), in one op:
    ``F.default_weights_TE(F.router_scores_TE(logits_TE), ...)``."""
    chosen_TE, selected_TE, options = default_op_inputs(router, logits_TE, probs_TE, routing_map_TE, normaliser)
    return fused.default_weights(logits_TE, chosen_TE, selected_TE, *options)


class DefaultTermInputs:
    """One forward pass's routing as the default term needs it (detached, nothing recomputed but
    the scores): its weights for the forward, its logits gradient for the backward."""

    def __init__(self, logits_TE: torch.Tensor):
        self.logits_TE = logits_TE.detach()
        self.chosen_TE = self.selected_TE = self.options = None
        self.term_grad = self.coordinates = None  # the term's (dL/dy, its version, table), or dL/dw; s's factors
        self.track = False  # also measure the extra gradient's size (logged steps)
        self.extra_grad_ratio = None

    def weights(self, dtype=None) -> torch.Tensor:
        """``w`` ``[T, E]`` in ``dtype`` (fp32 if None), not differentiable: its gradient takes
        ``receive_grad`` → ``logits_grad``."""
        with torch.no_grad():
            return fused.default_weights(self.logits_TE, self.chosen_TE, self.selected_TE, *self.options, dtype)

    def receive_grad(self, grad: torch.Tensor, table_KH: torch.Tensor = None, coordinates: F.Coordinates = None):
        """The term's ``dL/dy`` ``[T, H]`` and its table (``dL/dw = dL/dy @ tableᵀ``; with the
        ``shared-1`` coordinates, ``[A; B]`` and ``dL/dw = g_A + s ⊙ g_B``, ``s = x · d`` if not formed
        yet), all formed in ``logits_grad``'s one op; or ``dL/dw`` itself (``table_KH`` None)."""
        self.term_grad = (grad, grad._version, table_KH)
        self.coordinates = coordinates

    def logits_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """Megatron's logits gradient ``grad`` plus the default term's (one op)."""
        (term, coordinates), self.term_grad, self.coordinates = (self.term_grad, self.coordinates), None, None
        if term is None:
            return grad
        term_grad, version, table_KH = term
        if term_grad._version != version:
            raise RuntimeError("Default MoE: the layer output's gradient was modified in place between the default "
                               "term's backward and the router's, which reads it")  # fmt: skip
        grad_TE = grad.reshape(self.logits_TE.shape)
        args = (term_grad, self.logits_TE, self.chosen_TE, self.selected_TE, *self.options)
        line = dict(table_KH=table_KH)
        if coordinates is not None:
            x_TH, d_H, s_T1 = coordinates
            line.update(dict(s_T1=s_T1) if s_T1 is not None else dict(x_TH=x_TH, d_H=d_H))
        if not self.track:
            return fused.default_weights_backward(*args, grad_TE, **line).view(grad.shape)
        extra_TE = fused.default_weights_backward(*args, None, **line)
        # a device scalar: no host sync in the backward; analysis/metrics.py reads it at log time
        self.extra_grad_ratio = extra_TE.float().norm() / grad_TE.float().norm().clamp_min(1e-30)
        return (grad_TE + extra_TE).view(grad.shape)


class DefaultLogitGradient(torch.autograd.Function):
    """Identity on the logits Megatron routes; backward: ``DefaultTermInputs.logits_grad``."""

    @staticmethod
    def forward(ctx, logits, inputs: DefaultTermInputs):
        ctx.inputs = inputs
        return logits  # as is, like Megatron's MoEAuxLossAutoScaler

    @staticmethod
    def backward(ctx, grad):
        return ctx.inputs.logits_grad(grad), None


class DefaultMoERouter(TopKRouter):
    """TopK routing, plus ``default_term``: ``(DefaultTermInputs, logits)`` of the last routing.

    The weights are ``c·f / sg(N)`` where the probs are 0. Megatron never exposes the full score
    ``f`` (nor the normaliser ``N``), so both are computed here from the same logits; the expert
    bias and group limits only decide the selection, which Megatron's ``routing_map`` records.
    With a capacity factor the normaliser is taken over the pre-drop top-K (the selection is
    recomputed without dropping), so a dropped pair gets exactly the prob it lost. Tokens marked by
    ``padding_mask`` (True = padding, as Megatron's code reads it) get prob 0 and weight 0: they
    are still dispatched, but their rows count as padding and never reach the default vectors.
    The layer takes ``default_term`` right after the combine; ``logits`` (what Megatron routed)
    orders the default term's backward before ``DefaultLogitGradient``'s.
    """

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False, **kwargs):
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer, **kwargs)
        self.default_term = None
        self.default_normaliser = "selected"  # set by the layer from DefaultMoEConfig.normaliser
        self.track_extra_grad = False  # set by the layer on steps whose metrics are logged
        self._tracked = None  # the last tracked DefaultTermInputs

    @property
    def default_weights(self) -> torch.Tensor:
        """fp32 ``w`` ``[T, E]`` of the last routing (tests, diagnostics)."""
        return self.default_term[0].weights()

    @property
    def last_extra_grad_ratio(self):
        """‖extra logit gradient‖ / ‖stock logit gradient‖ of the last tracked backward (stock:
        Megatron's probs, aux and z losses), as a 0-d device tensor (read it at log time)."""
        return None if self._tracked is None else self._tracked.extra_grad_ratio

    def _apply_expert_bias(self, routing_map, padding_mask=None):
        """Megatron's expert-bias token count, with a padding mask it can broadcast (``compat``)."""
        super()._apply_expert_bias(routing_map, padding_mask=expert_bias_padding_mask(padding_mask))

    def routing(self, logits: torch.Tensor, padding_mask=None):
        inputs = DefaultTermInputs(logits.reshape(-1, self.config.num_moe_experts))
        if torch.is_grad_enabled() and logits.requires_grad:
            logits = DefaultLogitGradient.apply(logits, inputs)
            if self.track_extra_grad:
                inputs.track, self._tracked = True, inputs
        probs_TE, routing_map_TE = super().routing(logits, padding_mask=padding_mask)
        padding_T1 = None
        if padding_mask is not None:
            padding_T1 = padding_mask.reshape(-1, 1).bool()
            probs_TE = probs_TE * ~padding_T1
        inputs.chosen_TE, inputs.selected_TE, inputs.options = default_op_inputs(
            self, inputs.logits_TE, probs_TE, routing_map_TE, padding_T1=padding_T1
        )
        self.default_term = (inputs, logits)
        return probs_TE, routing_map_TE
