"""Megatron-Bridge's HF conversion with Default MoE layers in the model.

Bridge plans a conversion by walking a model's parameters and *persistent buffers* and mapping
each name to an HF tensor (``MegatronModelBridge.build_conversion_tasks``). HF checkpoints have
no slot for ``default_vectors``, so an unmapped name would leave an empty task and crash the load
or the export. While a plan is built, the layers' ``default_vectors`` are marked non-persistent
(``hide_default_vectors``; with them every other buffer the layer itself owns, e.g. its
sample counter): the plan skips them, and nothing else changes (Megatron checkpoints,
``state_dict``, Bridge's ``save_megatron_model`` keep them). Hence:

* HF -> Megatron: the vectors stay at zero, where a fresh Default MoE run starts (said once).
* Megatron -> HF: no default-vector tensor is written (said once); keep a Megatron checkpoint to
  keep the vectors.

Bridge also picks a tensor-parallel split for each module by its class name; ``DefaultMoERouter``
is registered as ``replicated``, like Megatron's ``TopKRouter``.
"""

import contextlib
import functools
import logging

from megatron_default_moe.update import default_moe_layers

logger = logging.getLogger(__name__)

_said = set()  # directions already announced in this process


@contextlib.contextmanager
def hide_default_vectors(model):
    """While active, the buffers ``model``'s Default MoE layers own themselves (``default_vectors``
    and its companions; none of Megatron's ``MoELayer``, whose buffers sit in submodules) are
    non-persistent, so a walk over persistent buffers skips them."""
    hidden = [(layer, set(layer._buffers) - layer._non_persistent_buffers_set) for layer in _layers_in(model)]
    for layer, names in hidden:
        layer._non_persistent_buffers_set.update(names)
    try:
        yield
    finally:
        for layer, names in hidden:
            layer._non_persistent_buffers_set.difference_update(names)


def _layers_in(*objects):
    import torch

    modules = []
    for obj in objects:
        if isinstance(obj, torch.nn.Module):
            modules.append(obj)
        elif isinstance(obj, (list, tuple)):
            modules.extend(m for m in obj if isinstance(m, torch.nn.Module))
    return default_moe_layers(modules)


def _say_once(direction: str, layers) -> None:
    if direction in _said or not layers:
        return
    _said.add(direction)
    if direction == "import":
        logger.warning(
            "Default MoE: HF checkpoints have no default vectors; the %d Default MoE layer(s) keep "
            "them at zero, like a fresh Default MoE run.", len(layers))
    else:
        logger.warning(
            "Default MoE: the HF export writes no default vectors (HF models have no slot for "
            "them); save a Megatron checkpoint to keep them.")


def _hiding(method, model_arg: int):
    """``method`` with the model's default vectors hidden while it plans (idempotent)."""
    if getattr(method, "_default_moe_hides", False):
        return method

    @functools.wraps(method)
    def plan_without_default_vectors(self, *args, **kwargs):
        model = kwargs.get("megatron_model", args[model_arg] if len(args) > model_arg else None)
        with hide_default_vectors(model):
            return method(self, *args, **kwargs)

    plan_without_default_vectors._default_moe_hides = True
    return plan_without_default_vectors


def _announcing(method, direction: str):
    """``method`` that says once per process what happens to the default vectors (idempotent)."""
    if getattr(method, "_default_moe_announces", False):
        return method

    @functools.wraps(method)
    def convert(self, *args, **kwargs):
        _say_once(direction, _layers_in(*args, *kwargs.values()))
        return method(self, *args, **kwargs)

    convert._default_moe_announces = True
    return convert


def announce_hf_import(model):
    """Pre-wrap hook after Bridge's HF load hook (bound before ``install_conversion_support`` could
    announce it): says once that the loaded model's default vectors start at zero."""
    _say_once("import", _layers_in(model))
    return model


def loads_hf_weights(hook) -> bool:
    """Whether a provider pre-wrap hook is Bridge's HF weight load (``to_megatron_provider``)."""
    func = getattr(hook, "func", None)
    return getattr(func, "__name__", None) == "load_weights_hf_to_megatron"


def install_conversion_support() -> None:
    """Teach Megatron-Bridge's conversion about Default MoE layers (idempotent, process-wide;
    a model without Default MoE layers converts as before)."""
    from megatron.bridge.models.conversion.model_bridge import MegatronModelBridge
    from megatron.bridge.models.conversion.param_mapping import AutoMapping

    AutoMapping.register_module_type("DefaultMoERouter", "replicated")
    cls = MegatronModelBridge
    # build_conversion_tasks(hf_pretrained, megatron_model, ...), build_export_fp8_tasks(same)
    cls.build_conversion_tasks = _hiding(cls.build_conversion_tasks, model_arg=1)
    cls.build_export_fp8_tasks = _hiding(cls.build_export_fp8_tasks, model_arg=1)
    cls.load_weights_hf_to_megatron = _announcing(cls.load_weights_hf_to_megatron, "import")
    cls.stream_weights_hf_to_megatron = _announcing(cls.stream_weights_hf_to_megatron, "import")
    cls.stream_weights_megatron_to_hf = _announcing(cls.stream_weights_megatron_to_hf, "export")
