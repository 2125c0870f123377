"""``DefaultMoERouter``: Megatron's TopK router that also keeps the default-term weights."""

import torch
from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function
from megatron.core.transformer.moe.router import TopKRouter

from megatron_default_moe import functional as F


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
        self.renormalise = F.renormalises(self.score_function, config.moe_router_pre_softmax, self.topk)
        self.scale = config.moe_router_topk_scaling_factor or 1.0
        self.eps = F.SIGMOID_EPS if self.score_function != "softmax" else 0.0

    def _pre_drop_selection_TE(self, logits_TE: torch.Tensor) -> torch.Tensor:
        """The top-K set before capacity dropping (same scores, bias, groups as Megatron's)."""
        with torch.no_grad():
            _, selected_TE = topk_routing_with_score_function(
                logits_TE,
                self.topk,
                use_pre_softmax=self.config.moe_router_pre_softmax,
                num_groups=self.config.moe_router_num_groups,
                group_topk=self.config.moe_router_group_topk,
                scaling_factor=self.config.moe_router_topk_scaling_factor,
                score_function=self.score_function,
                expert_bias=self.expert_bias,
                fused=self.config.moe_router_fusion,
            )
        return selected_TE

    def routing(self, logits: torch.Tensor, padding_mask=None):
        probs_TE, routing_map_TE = super().routing(logits, padding_mask=padding_mask)
        logits_TE = logits.reshape(probs_TE.shape)
        if padding_mask is not None:
            valid_T1 = ~padding_mask.reshape(-1, 1).bool()
            probs_TE = probs_TE * valid_T1
        selected_TE = routing_map_TE
        if self.renormalise and self.config.moe_expert_capacity_factor is not None:
            selected_TE = self._pre_drop_selection_TE(logits_TE.detach())
        weights_TE = F.default_weights_TE(
            F.router_scores_TE(logits_TE, self.score_function),
            probs_TE,
            selected_TE,
            scale=self.scale,
            renormalise=self.renormalise,
            eps=self.eps,
        )
        self.default_weights = weights_TE if padding_mask is None else weights_TE * valid_T1
        return probs_TE, routing_map_TE
