"""``DefaultMoERouter``: Megatron's TopK router that also keeps the default-term weights."""

import torch
from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function
from megatron.core.transformer.moe.router import TopKRouter

from megatron_default_moe import functional as F
from megatron_default_moe import fused


def default_weights_of(router: TopKRouter, logits_TE, probs_TE, routing_map_TE, normaliser=None) -> torch.Tensor:
    """``c·f / sg(N)`` where ``probs_TE`` is 0, for any Megatron ``TopKRouter`` (see the class);
    ``normaliser`` defaults to the router's ``default_normaliser`` (``"selected"`` if it has none)."""
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
    return fused.default_weights(  # F.default_weights_TE(F.router_scores_TE(logits_TE), ...) in one op
        logits_TE,
        chosen_TE,
        selected_TE,
        router.score_function,
        renormalise,
        normaliser == "all",
        float(config.moe_router_topk_scaling_factor or 1.0),
        F.SIGMOID_EPS if router.score_function != "softmax" else 0.0,
    )


class DefaultMoERouter(TopKRouter):
    """TopK routing, plus ``default_weights`` ``[T, E]``: ``c·f / sg(N)`` where the probs are 0.

    Megatron never exposes the full score ``f`` (nor the normaliser ``N``), so both are computed
    here from the same logits; the expert bias and group limits only decide the selection, which
    Megatron's ``routing_map`` records. With a capacity factor the normaliser is taken over the
    pre-drop top-K (the selection is recomputed without dropping), so a dropped pair gets exactly
    the prob it lost. Tokens marked by ``padding_mask`` (True = padding, as Megatron's code reads
    it) get prob 0 and weight 0: they are still dispatched, but their rows count as padding and
    never reach the default vectors. The layer reads ``default_weights`` right after routing.
    """

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False, **kwargs):
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer, **kwargs)
        self.default_weights = None
        self.default_normaliser = "selected"  # set by the layer from DefaultMoEConfig.normaliser
        self.track_extra_grad = False  # set by the layer on steps whose metrics are logged
        self.last_extra_grad_ratio = None  # ‖extra logit gradient‖ / ‖stock logit gradient‖

    def _watch_extra_gradient(self, logits, logits_TE):
        """After backward, ``last_extra_grad_ratio``: the default term's share of the logit gradient.

        ``logits_TE`` is a view that only the default weights read, so its gradient is the extra
        one; ``logits`` receives the extra plus Megatron's own (probs, aux and z losses).
        """
        extra = {}
        logits_TE.register_hook(lambda g: extra.__setitem__("g", g.detach().float()))

        def on_total(g_total):
            g_extra = extra.get("g", torch.zeros_like(g_total, dtype=torch.float32)).reshape(g_total.shape)
            stock = (g_total.float() - g_extra).norm()
            self.last_extra_grad_ratio = float(g_extra.norm() / stock.clamp_min(1e-30))

        logits.register_hook(on_total)

    def routing(self, logits: torch.Tensor, padding_mask=None):
        probs_TE, routing_map_TE = super().routing(logits, padding_mask=padding_mask)
        logits_TE = logits.view(probs_TE.shape)  # a view of its own (see _watch_extra_gradient)
        if self.track_extra_grad and logits.requires_grad and torch.is_grad_enabled():
            self._watch_extra_gradient(logits, logits_TE)
        if padding_mask is not None:
            valid_T1 = ~padding_mask.reshape(-1, 1).bool()
            probs_TE = probs_TE * valid_T1
        weights_TE = default_weights_of(self, logits_TE, probs_TE, routing_map_TE)
        self.default_weights = weights_TE if padding_mask is None else weights_TE * valid_T1
        return probs_TE, routing_map_TE
