"""Turn Megatron GPT layer / block specs into their Default MoE form.

In megatron-core 0.19 an MoE mlp in a spec is ``partial(MoELayer, submodules=MoESubmodules(...))``;
older releases used ``ModuleSpec(module=MoELayer, submodules=...)``. Both are rewritten to build a
``DefaultMoELayer`` with the ``DefaultMoERouter``. Nothing else in the spec is touched.
"""

import dataclasses
import functools

from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_default_moe.config import DefaultMoEConfig
from megatron_default_moe.layer import DefaultMoELayer, with_default_moe_router


def _default_moe_mlp(mlp, dm_config):
    """The Default MoE form of one mlp builder, or ``mlp`` itself if it is not an MoE layer."""
    if isinstance(mlp, functools.partial) and mlp.func is MoELayer:
        kwargs = dict(mlp.keywords)
        kwargs["submodules"] = with_default_moe_router(kwargs["submodules"])
        return functools.partial(DefaultMoELayer, *mlp.args, dm_config=dm_config, **kwargs)
    if isinstance(mlp, ModuleSpec) and mlp.module is MoELayer:
        params = dict(mlp.params or {}, dm_config=dm_config)
        return dataclasses.replace(
            mlp,
            module=DefaultMoELayer,
            submodules=with_default_moe_router(mlp.submodules),
            params=params,
        )
    return mlp


def to_default_moe_spec(spec, dm_config: DefaultMoEConfig = None):
    """A copy of a GPT layer spec, layer submodules or block spec with every MoE mlp replaced.

    All MoE layers share one ``dm_config`` object.
    """
    dm_config = dm_config if dm_config is not None else DefaultMoEConfig()
    if isinstance(spec, (list, tuple)):
        return type(spec)(to_default_moe_spec(s, dm_config) for s in spec)
    if isinstance(spec, ModuleSpec):
        if spec.module is MoELayer:
            return _default_moe_mlp(spec, dm_config)
        if spec.submodules is None:
            return spec
        return dataclasses.replace(spec, submodules=to_default_moe_spec(spec.submodules, dm_config))
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        changes = {}
        if hasattr(spec, "layer_specs"):
            changes["layer_specs"] = to_default_moe_spec(spec.layer_specs, dm_config)
        if hasattr(spec, "mlp"):
            changes["mlp"] = _default_moe_mlp(spec.mlp, dm_config)
        return dataclasses.replace(spec, **changes) if changes else spec
    return spec


def default_moe_spec(model_config, vp_stage=None, dm_config: DefaultMoEConfig = None):
    """``--spec megatron_default_moe.spec default_moe_spec``: Megatron's GPT decoder block spec
    for ``model_config`` (Transformer Engine when importable), in its Default MoE form.

    ``model_config`` is a ``GPTModelConfig`` (what ``megatron.training`` passes) or a
    ``TransformerConfig``. ``dm_config`` defaults to its transformer config's ``default_moe``
    attribute if set (the entry script sets it from the flags), else to ``DefaultMoEConfig()``.
    """
    from megatron_default_moe.compat import gpt_decoder_block_spec, transformer_config_of

    if dm_config is None:
        dm_config = getattr(transformer_config_of(model_config), "default_moe", None)
        dm_config = dm_config or DefaultMoEConfig()
    block_spec = gpt_decoder_block_spec(model_config, vp_stage=vp_stage)
    return to_default_moe_spec(block_spec, dm_config)
