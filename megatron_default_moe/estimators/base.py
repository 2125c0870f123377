"""The one interface through which ``DefaultMoELayer`` estimates its default vectors.

Per training pass the layer calls, in order: ``see_input`` and ``route`` (token's rank, after
the router), ``take_stats`` (expert rank, before the combine), then ``apply`` (statistics reduced
over the stage: one EMA step) or ``frozen`` (no update in this pass), then ``term_args`` (what
``functional.add_default_term`` gets). ``stats_shape`` sizes step mode's accumulator, ``loaded``
runs after a checkpoint load. A new estimator is one subclass in this folder plus its op.

``Estimator`` itself holds what every constant default shares: one vector per expert,
``default_vectors``, moved by the fused EMA op.
"""

from megatron_default_moe.ops import ema as fused


class Estimator:
    """A constant default per expert; subclasses say where its statistics come from."""

    probes = None  # the ``ProbeSampler`` of an estimator that sends probes
    fit = None  # the ``SharedLineFit`` of an estimator whose default is a line

    def see_input(self, layer, x_TH, takes_stats: bool) -> None:
        """``route``: the layer's input of this pass (before the router's output is used)."""

    def route(self, layer, probs_TE, routing_map_TE, counter: int):
        """``(probs, routing_map, extra pairs)`` that the dispatcher sends, in a pass that takes
        statistics (``counter``: micro-batches counted so far)."""
        return probs_TE, routing_map_TE, 0

    def take_stats(self, layer, out_RH, probs_R, tokens_per_expert, in_RH, counter: int):
        """``(rows the combine takes, this rank's statistics ``stats_shape``)``."""
        raise NotImplementedError

    def stats_shape(self, experts: int, hidden: int):
        return experts, hidden + 1

    def apply(self, layer, stats, beta: float, dtype):
        """One EMA step from reduced statistics: ``(the pass's snapshot, bool [E] updated)``."""
        return fused.ema_update(layer.default_vectors, stats, beta, layer.nonfinite_skips, dtype)

    def frozen(self, layer, dtype):
        """The snapshot of the current state, for a pass that updates nothing."""
        return layer.default_vectors.detach().to(dtype, copy=True)  # cast once per pass

    def term_args(self, snapshot):
        """``(table, keyword arguments)`` of ``functional.add_default_term`` for this pass."""
        return snapshot, {}

    def loaded(self, layer) -> None:
        """After a checkpoint load (derived state is set again here)."""
