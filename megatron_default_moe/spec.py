"""Turn Megatron layer / block / stack specs into their Default MoE form.

In megatron-core 0.19 an MoE mlp in a spec is ``partial(MoELayer, submodules=MoESubmodules(...))``;
older releases used ``ModuleSpec(module=MoELayer, submodules=...)``. Both are rewritten to build a
``DefaultMoELayer`` with the ``DefaultMoERouter``, wherever they sit: a GPT layer or block spec, a
hybrid stack spec (``HybridStackSubmodules.moe_layer``, whose MTP layers reuse it), or an MTP
block spec. Nothing else in the spec is touched, and the input is never mutated.
"""

import copy
import dataclasses
import functools
import logging

from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_default_moe.config import DefaultMoEConfig
from megatron_default_moe.layer import DefaultMoELayer, with_default_moe_router

logger = logging.getLogger(__name__)


def _is_moe_class(module) -> bool:
    return isinstance(module, type) and issubclass(module, MoELayer)


def _default_moe_mlp(mlp, dm_config, explicit):
    """The Default MoE form of one MoE mlp builder (``partial`` or ``ModuleSpec``).

    A builder that is already Default MoE keeps its ``dm_config`` unless one is given explicitly.
    """
    if isinstance(mlp, functools.partial):
        kwargs = dict(mlp.keywords)
        if mlp.func is DefaultMoELayer and not explicit:
            return mlp
        kwargs["submodules"] = with_default_moe_router(kwargs["submodules"])
        kwargs["dm_config"] = dm_config
        return functools.partial(DefaultMoELayer, *mlp.args, **kwargs)
    if mlp.module is DefaultMoELayer and not explicit:
        return mlp
    params = dict(mlp.params or {}, dm_config=dm_config)
    return dataclasses.replace(
        mlp, module=DefaultMoELayer, submodules=with_default_moe_router(mlp.submodules), params=params
    )


def _check_moe_class(module):
    if module not in (MoELayer, DefaultMoELayer):
        raise ValueError(
            f"Default MoE: the spec builds {module.__qualname__}, a subclass of MoELayer; "
            "only Megatron's MoELayer can be made Default MoE"
        )


def _rewrite(spec, dm_config, explicit):
    if isinstance(spec, (list, tuple)):
        items = [_rewrite(s, dm_config, explicit) for s in spec]
        return spec if all(a is b for a, b in zip(items, spec)) else type(spec)(items)
    if isinstance(spec, functools.partial):
        if _is_moe_class(spec.func):
            _check_moe_class(spec.func)
            return _default_moe_mlp(spec, dm_config, explicit)
        return spec
    if isinstance(spec, ModuleSpec) and _is_moe_class(spec.module):
        _check_moe_class(spec.module)
        return _default_moe_mlp(spec, dm_config, explicit)
    if not dataclasses.is_dataclass(spec) or isinstance(spec, type):
        return spec
    # ModuleSpec (only its submodules), TransformerLayerSubmodules, TransformerBlockSubmodules,
    # HybridStackSubmodules, MultiTokenPrediction*Submodules, ...: every field that holds a spec.
    names = ("submodules",) if isinstance(spec, ModuleSpec) else [f.name for f in dataclasses.fields(spec)]
    changes = {}
    for name in names:
        value = getattr(spec, name)
        new = _rewrite(value, dm_config, explicit)
        if new is not value:
            changes[name] = new
    if not changes:
        return spec
    out = copy.copy(spec)  # not ``replace``: no __init__ / __post_init__ re-run, init=False fields kept
    for name, value in changes.items():
        object.__setattr__(out, name, value)
    return out


def to_default_moe_spec(spec, dm_config: DefaultMoEConfig = None):
    """A copy of a spec with every MoE mlp replaced by Default MoE.

    ``spec``: a GPT layer spec, layer submodules, block spec, MTP block spec, a hybrid stack
    spec (``ModuleSpec(HybridStack, HybridStackSubmodules(...))``) or a list of these. All MoE
    layers share one ``dm_config``; given explicitly, it also replaces the config of MoE layers
    that are already Default MoE (a Megatron-LM flag overrides a spec's default). Subtrees without
    an MoE layer are returned as they are (same objects).
    """
    explicit = dm_config is not None
    return _rewrite(spec, dm_config if explicit else DefaultMoEConfig(), explicit)


def default_moe_spec(model_config, vp_stage=None, dm_config: DefaultMoEConfig = None):
    """``--spec megatron_default_moe.spec default_moe_spec``: Megatron's GPT decoder block spec
    for ``model_config`` (Transformer Engine when importable), in its Default MoE form.

    ``model_config`` is a ``GPTModelConfig`` (what ``megatron.training`` passes) or a
    ``TransformerConfig``. ``dm_config`` defaults to its transformer config's ``default_moe``
    attribute if set (the entry script sets it from the flags), else to ``DefaultMoEConfig()``.
    """
    from megatron_default_moe.compat import gpt_decoder_block_spec, transformer_config_of

    config = transformer_config_of(model_config)
    if config.mtp_num_layers and getattr(config, "default_moe", None) is None:
        logger.warning(
            "Default MoE spec: --mtp-num-layers is set, but Megatron builds the MTP layers from its "
            "own default specs, so their MoE layers stay TopK on the --spec route; "
            "examples/pretrain_gpt_default_moe.py --moe-default-vectors makes them Default MoE."
        )
    if dm_config is None:
        dm_config = getattr(config, "default_moe", None) or DefaultMoEConfig()
    block_spec = gpt_decoder_block_spec(model_config, vp_stage=vp_stage)
    return to_default_moe_spec(block_spec, dm_config)
