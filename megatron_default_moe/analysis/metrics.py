"""Default-vector statistics and GPU telemetry in Megatron's TensorBoard / W&B logs.

Megatron's ``training_log`` reports a fixed list of MoE metrics, so Default MoE logs its own,
from a wrapper around ``config.finalize_model_grads_func`` (run once per optimizer step, on every
rank, after all backward passes and after the ``update="step"`` EMA step):

- ``default_moe_stats(model)``: pure; per layer (global layer number) the mean L2 norm of the
  experts' default vectors, the mean pairwise cosine between the non-zero ones, the number of
  experts the last EMA step updated, the cumulative non-finite skips, and
  ‖default term‖ / ‖MoE output‖ of the last forward and ‖extra router-logit gradient‖ / ‖stock
  one‖ of the last backward (layers with ``track_metrics``; this rank's tokens); plus the mean
  over layers of each.
- ``log_default_moe_metrics(model, iteration, ...)``: gathers the stats of all pipeline stages
  and writes them, with ``gpu_telemetry()``, through the given writers.
- ``install_training_hooks(model, log_interval)``: the ``finalize_model_grads_func`` wrappers.
- ``gpu_telemetry()`` (``gpu_telemetry.py``): this rank's GPU through ``nvidia-ml-py``.
"""

import functools

import torch

from megatron_default_moe.analysis.gpu_telemetry import gpu_telemetry
from megatron_default_moe.update import default_moe_layers, wrap_finalize_model_grads

PREFIX = "default_moe"


# -- default-vector statistics ---------------------------------------------------------------
def _pairwise_cosine_t(vectors_EH: torch.Tensor) -> torch.Tensor:
    """Mean cosine over pairs of distinct non-zero vectors (0 with fewer than two), on the device:
    a masked sum instead of boolean indexing, which would sync to size its result."""
    norms_E = vectors_EH.norm(dim=1)
    nonzero_E = (norms_E > 0).to(vectors_EH.dtype)
    unit_EH = vectors_EH / norms_E.clamp_min(1e-30)[:, None] * nonzero_E[:, None]
    cos_EE = unit_EH @ unit_EH.T
    n = nonzero_E.sum()
    pairs = (n * (n - 1)).clamp_min(1.0)
    return (cos_EE.sum() - cos_EE.diagonal().sum()) / pairs


def _mean_pairwise_cosine(vectors_EH: torch.Tensor) -> float:
    return float(_pairwise_cosine_t(vectors_EH))


def _layer_stat_tensors(layer) -> dict:
    """One ``DefaultMoELayer``'s statistics as 0-d tensors on its device (no host sync)."""
    vectors_EH = layer.default_vectors.detach().float()
    zero = vectors_EH.new_zeros(())
    stats = {
        "vector_norm": vectors_EH.norm(dim=1).mean(),
        "pairwise_cosine": _pairwise_cosine_t(vectors_EH),
        "experts_updated": layer.experts_updated.sum().float() if layer.experts_updated is not None else zero,
        "nonfinite_skips": layer.nonfinite_skips.sum().float(),
    }
    ratio = getattr(layer, "last_term_norm_ratio", None)
    if ratio is not None:
        stats["term_norm_ratio"] = torch.as_tensor(ratio, dtype=torch.float32, device=vectors_EH.device)
    extra = getattr(layer.router, "last_extra_grad_ratio", None)
    if extra is not None:  # ‖router-logit gradient of the default term‖ / ‖stock one‖ (a device scalar)
        stats["extra_router_grad_ratio"] = torch.as_tensor(extra, dtype=torch.float32, device=vectors_EH.device)
    return stats


def _to_floats(stats_by_key: dict) -> dict:
    """``{key: {stat: 0-d tensor}}`` as Python floats, in one device-to-host copy."""
    flat = [(key, stat, value) for key, stats in stats_by_key.items() for stat, value in stats.items()]
    if not flat:
        return {key: {} for key in stats_by_key}
    values = torch.stack([value.reshape(()).to(flat[0][2].device) for _, _, value in flat]).tolist()
    out = {key: {} for key in stats_by_key}
    for (key, stat, _), value in zip(flat, values):
        out[key][stat] = value
    return out


def layer_stats(layer) -> dict:
    """Statistics of one ``DefaultMoELayer`` as Python floats."""
    with torch.no_grad():
        return _to_floats({0: _layer_stat_tensors(layer)})[0]


def per_layer_stats(model) -> dict:
    """``{layer number: layer_stats}`` for the Default MoE layers of ``model`` (or model chunks);
    the per-step device scalars (e.g. the router's extra-gradient ratio) reach the host here, in
    one copy for all layers."""
    tensors = {}
    with torch.no_grad():
        for index, layer in enumerate(default_moe_layers(model)):
            number = getattr(layer, "layer_number", None)
            tensors[int(number) if number is not None else index + 1] = _layer_stat_tensors(layer)
    return _to_floats(tensors)


def flatten_stats(per_layer: dict) -> dict:
    """``{"default_moe/<stat>/layer_<n>": v, "default_moe/<stat>/mean": mean over layers}``."""
    metrics, by_stat = {}, {}
    for number in sorted(per_layer):
        for stat, value in per_layer[number].items():
            metrics[f"{PREFIX}/{stat}/layer_{number}"] = value
            by_stat.setdefault(stat, []).append(value)
    for stat, values in by_stat.items():
        metrics[f"{PREFIX}/{stat}/mean"] = sum(values) / len(values)
    return metrics


def default_moe_stats(model) -> dict:
    """The metrics dict of this rank's Default MoE layers (pure: reads buffers, no collective)."""
    return flatten_stats(per_layer_stats(model))


# -- writing ---------------------------------------------------------------------------------
def _pipeline_group():
    try:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            return parallel_state.get_pipeline_model_parallel_group()
    except Exception:
        pass
    return None


def gather_over_pipeline(per_layer: dict, group=None) -> dict:
    """Merge the per-layer stats of all pipeline stages (collective over ``group``)."""
    if group is None or not torch.distributed.is_initialized() or torch.distributed.get_world_size(group) < 2:
        return per_layer
    gathered = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(gathered, per_layer, group=group)
    merged = {}
    for part in gathered:
        merged.update(part)
    return merged


def megatron_writers():
    """Megatron's ``(tensorboard writer, wandb writer)``; ``None`` where not set up."""
    try:
        from megatron.training.global_vars import get_tensorboard_writer, get_wandb_writer

        return get_tensorboard_writer(), get_wandb_writer()
    except Exception:
        return None, None


def write_metrics(metrics: dict, iteration: int, writer=None, wandb_writer=None) -> None:
    if writer is not None:
        for name, value in metrics.items():
            writer.add_scalar(name, value, iteration)
    if wandb_writer is not None and metrics:
        wandb_writer.log(metrics, iteration)


def log_default_moe_metrics(model, iteration: int, writer=None, wandb_writer=None, pp_group="auto") -> dict:
    """Gather the stats over pipeline stages, add GPU telemetry, write; returns the metrics.

    Collective over the pipeline-parallel group when it has more than one rank.
    """
    group = _pipeline_group() if pp_group == "auto" else pp_group
    metrics = flatten_stats(gather_over_pipeline(per_layer_stats(model), group))
    metrics.update(gpu_telemetry())
    write_metrics(metrics, iteration, writer, wandb_writer)
    return metrics


# -- hooks -----------------------------------------------------------------------------------
def _megatron_iteration():
    """The iteration Megatron's ``training_log`` will report for the step in progress."""
    try:
        from megatron.training.global_vars import get_args

        return get_args().curr_iteration + 1
    except Exception:
        return None


def install_training_hooks(model, log_interval: int | None = 100, config=None, writers=megatron_writers,
                           iteration=_megatron_iteration) -> None:
    """Wrap ``config.finalize_model_grads_func`` for Default MoE (idempotent).

    Installs Megatron's ``finalize_model_grads`` if no hook is set yet (what ``train()`` would
    do; it keeps a hook that is already set), adds ``update_default_vectors`` (the ``update="step"``
    EMA step, and the per-step NaN/Inf skip warning in either mode), and logs ``log_default_moe_metrics`` at iterations divisible by ``log_interval``
    (``None`` or 0: no logging). ``writers()`` gives ``(tensorboard, wandb)``; ``iteration()``
    the 1-based iteration of the running step (``None``: count calls).
    """
    from megatron.core.utils import get_model_config

    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    config = config if config is not None else get_model_config(chunks[0])
    if config.finalize_model_grads_func is None:
        from megatron.core.distributed import finalize_model_grads

        config.finalize_model_grads_func = finalize_model_grads
    layers = default_moe_layers(chunks)
    if layers:  # the update="step" EMA step, and NaN/Inf skip warnings in both modes
        wrap_finalize_model_grads(config)
    if not log_interval or getattr(config.finalize_model_grads_func, "_default_moe_metrics", False):
        return
    for layer in layers:
        layer.track_metrics = True  # the first logged step may be the first step
    inner = config.finalize_model_grads_func
    calls = {"n": 0}

    @functools.wraps(inner)
    def finalize_and_log(model_chunks, *args, **kwargs):
        out = inner(model_chunks, *args, **kwargs)
        calls["n"] += 1
        step = iteration() or calls["n"]
        if step % log_interval == 0:
            log_default_moe_metrics(model_chunks, step, *writers())
        for layer in layers:
            layer.track_metrics = (step + 1) % log_interval == 0
        return out

    finalize_and_log._default_moe_metrics = True
    config.finalize_model_grads_func = finalize_and_log
