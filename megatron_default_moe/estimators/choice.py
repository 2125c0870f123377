"""Which estimator a layer runs, from its ``DefaultMoEConfig`` resolved for its router and layout."""

from megatron_default_moe.estimators.probes import ProbeMean, probe_sampler_of
from megatron_default_moe.estimators.routed_rows import RoutedRowEMA
from megatron_default_moe.estimators.shared_fit import SharedLineFit


def estimator_of(layer):
    """The routed rows' EMA, the probes' mean, or the ``shared-1`` line (registers its tables)."""
    dm = layer.dm_config
    probes = probe_sampler_of(layer)
    if dm.resolved_fit(layer.config, probes is not None) == "shared-1":
        if probes is None:
            raise ValueError("--moe-default-fit shared-1 needs probes, but --moe-default-probes "
                             f"{dm.requested_probes(layer.config)!r} resolves to 0 here (see the log)")
        return SharedLineFit(layer, dm.probe_seed, probes)
    if probes is not None:
        return ProbeMean(probes)
    return RoutedRowEMA(dm.ema_weighting, dm.stats_stride)
