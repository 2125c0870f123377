"""A token-dispatcher mixin that hands the experts' outputs to the layer before the combine.

Megatron picks the dispatcher class from ``moe_token_dispatcher_type`` inside ``MoELayer``, so the
Default MoE layer rebuilds it as ``mixin + that class``. The mixin changes no tensor: it remembers
what ``dispatch_postprocess`` returned (rows per local expert, each row's prob) and, on the expert
rank, calls ``on_expert_output(out_RH, probs_R, tokens_per_expert, in_RH)`` (``in``: the experts'
input rows, a reference) just before
``combine_preprocess``, so the layer can launch its statistics all-reduce to overlap the combine;
the combine takes what that returns (the same rows, with any probe rows zeroed: ``estimators/probes.py``).
"""

import functools


class DefaultMoEDispatcherMixin:
    """Mixin over a Megatron ``MoETokenDispatcher`` subclass; see the module docstring."""

    on_expert_output = None
    extra_routed_pairs = 0  # probe pairs the layer added to this micro-batch's routing map

    def preprocess(self, routing_map):
        """The all-to-all dispatcher's dropless row count is static (``tokens × topk``): add the
        probe pairs (``estimators/probes.py``), a host-known number."""
        out = super().preprocess(routing_map)
        if self.extra_routed_pairs and not self.drop_and_pad and self.config.moe_expert_capacity_factor is None:
            self.num_out_tokens += self.extra_routed_pairs
        return out

    def dispatch_postprocess(self, hidden_states, probs):
        dispatched, tokens_per_expert, permuted_probs = super().dispatch_postprocess(hidden_states, probs)
        self._dm_rows = (tokens_per_expert, permuted_probs, dispatched)
        return dispatched, tokens_per_expert, permuted_probs

    def combine_preprocess(self, hidden_states):
        rows, self._dm_rows = getattr(self, "_dm_rows", None), None
        if self.on_expert_output is not None and rows is not None:
            tokens_per_expert, permuted_probs, in_RH = rows
            hidden_states = self.on_expert_output(hidden_states, permuted_probs, tokens_per_expert, in_RH)
        return super().combine_preprocess(hidden_states)


@functools.cache
def with_default_moe_mixin(dispatcher_cls: type) -> type:
    """``DefaultMoE<Base>``: the mixin over ``dispatcher_cls`` (one class per base)."""
    if issubclass(dispatcher_cls, DefaultMoEDispatcherMixin):
        return dispatcher_cls
    return type(f"DefaultMoE{dispatcher_cls.__name__}", (DefaultMoEDispatcherMixin, dispatcher_cls), {})
