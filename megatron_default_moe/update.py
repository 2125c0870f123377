"""``update="step"``: one bucketed all-reduce and one EMA step per optimizer step.

``update_default_vectors(model)`` is the plain entry point for custom training loops (call it once
after the backward of the last micro-batch); in either update mode it also reports NaN/Inf
skips (``report_nonfinite_skips``). ``wrap_finalize_model_grads(config)`` calls it from
Megatron's ``config.finalize_model_grads_func``, which every Megatron schedule runs exactly once
per optimizer step, after all backward passes.
"""

import functools
import logging
import weakref

import torch

from megatron_default_moe.layer import DefaultMoELayer, _group_rank, _group_size

logger = logging.getLogger(__name__)

_reported_skips = weakref.WeakKeyDictionary()  # layer -> its ``nonfinite_skips`` at the last report


def default_moe_layers(model):
    """The ``DefaultMoELayer``s of a module or a list of model chunks, in module order."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, DefaultMoELayer)]


def update_default_vectors(model) -> int:
    """Reduce this step's statistics over each layer's stage group in one bucket and apply the EMA.

    Collective over the ranks of the pipeline stage (every rank must call it). Layers in
    ``microbatch`` mode are skipped. Returns the number of layers updated.
    """
    all_layers = default_moe_layers(model)
    layers = [m for m in all_layers if m.dm_config.update == "step"]
    by_group = {}
    for layer in layers:
        by_group.setdefault(layer.stats_group, []).append(layer)
    for group, group_layers in by_group.items():
        bucket_LEH1 = torch.stack([layer.take_step_stats() for layer in group_layers])
        if _group_size(group) > 1:
            torch.distributed.all_reduce(bucket_LEH1, group=group)
        for layer, stats_EH1 in zip(group_layers, bucket_LEH1):
            layer.apply_ema(stats_EH1)
    _report_nonfinite_skips(all_layers)
    return len(layers)


def report_nonfinite_skips(model) -> dict:
    """Warn about experts whose EMA update was skipped for NaN/Inf outputs since the last call.

    The forward only counts skips on the device (``nonfinite_skips``); this reads all layers'
    counters in one device-to-host copy, so call it once per step (``update_default_vectors`` and
    the finalize wrapper do), not per micro-batch. Counters are identical on every rank of a
    stage; the first rank of each stage logs. Returns ``{layer_number: [expert, ...]}``.
    """
    return _report_nonfinite_skips(default_moe_layers(model))


def _report_nonfinite_skips(layers) -> dict:
    if not layers:
        return {}
    counts = torch.cat([layer.nonfinite_skips for layer in layers]).cpu()  # the one host sync
    counts_per_layer = counts.split([layer.nonfinite_skips.numel() for layer in layers])
    found = {}
    for layer, counts_E in zip(layers, counts_per_layer):
        before_E = _reported_skips.get(layer, torch.zeros_like(counts_E))
        _reported_skips[layer] = counts_E
        experts = (counts_E > before_E).nonzero().flatten().tolist()
        if not experts:
            continue
        found[layer.layer_number] = experts
        if _group_rank(layer.stats_group) == 0:
            logger.warning(
                "Default MoE layer %s: NaN/Inf outputs of expert(s) %s; their default vectors "
                "kept their previous value (skipped updates so far: %s)",
                layer.layer_number,
                experts,
                counts_E[experts].tolist(),
            )
    return found


def wrap_finalize_model_grads(config) -> None:
    """Make ``config.finalize_model_grads_func`` also call ``update_default_vectors`` (idempotent).

    Megatron's schedules call it as ``finalize_model_grads_func(model_chunks, ...)``.
    """
    inner = config.finalize_model_grads_func
    if inner is None:
        raise ValueError(
            "Default MoE update='step' needs config.finalize_model_grads_func (Megatron installs "
            "finalize_model_grads in training); call update_default_vectors(model) yourself otherwise"
        )
    if getattr(inner, "_default_moe_wrapped", False):
        return

    @functools.wraps(inner)
    def finalize_and_update_default_vectors(model, *args, **kwargs):
        out = inner(model, *args, **kwargs)
        update_default_vectors(model)
        return out

    finalize_and_update_default_vectors._default_moe_wrapped = True
    config.finalize_model_grads_func = finalize_and_update_default_vectors
