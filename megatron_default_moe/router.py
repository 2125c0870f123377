"""``DefaultMoERouter``: Megatron's TopK router that also keeps the default-term weights."""

import torch
from megatron.core.transformer.moe.router import TopKRouter

from megatron_default_moe.functional import default_weights_TE


class DefaultMoERouter(TopKRouter):
    """TopK routing, plus ``default_weights``: ``π`` (full fp32 softmax) where the TopK probs are 0.

    Megatron never exposes the full distribution, so it is computed here from the same logits.
    Using ``probs == 0`` rather than ``~routing_map`` also gives defaults to pairs a capacity
    factor dropped. The layer reads ``default_weights`` right after routing, in token order.
    """

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False, **kwargs):
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer, **kwargs)
        self.default_weights = None

    def routing(self, logits: torch.Tensor, *args, **kwargs):
        probs_TE, routing_map_TE = super().routing(logits, *args, **kwargs)
        self.default_weights = default_weights_TE(logits.reshape(probs_TE.shape), probs_TE)
        return probs_TE, routing_map_TE
