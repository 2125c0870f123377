"""The Default MoE form of the layer spec Megatron-Bridge chose, as something Bridge can save.

A ``GPTModelProvider`` resolves ``transformer_layer_spec`` (a spec, or a callable taking the
provider and maybe ``vp_stage``) in ``provide()`` and again in ``mtp_block_spec()``, and writes it
into ``run_config.yaml`` as ``_target_: module.qualname`` (``functools.partial`` supported). So the
wrapper is a module-level function bound with ``partial``, never a closure: a Bridge checkpoint
rebuilds Default MoE layers from its own run config, and the MTP layers follow the same spec.

megatron-core's ``GPTModelConfig`` drops callable fields when it serialises and builds its MTP
layers from Megatron's default specs, whatever ``transformer_layer_spec`` says. There the Default
MoE settings travel in ``extra_checkpoint_metadata["default_moe"]`` (saved with the config) and a
``GPTModelBuilder`` subclass, named by the config's ``builder`` string (also saved), applies them
to the decoder and the MTP spec at build time.
"""

import dataclasses
import functools
import inspect

from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_default_moe.config import DefaultMoEConfig
from megatron_default_moe.spec import to_default_moe_spec

METADATA_KEY = "default_moe"


def _resolve(spec, config, vp_stage):
    """What GPTModelProvider.provide() does with a spec field: call it if it is a callable."""
    if spec is None or isinstance(spec, ModuleSpec) or not callable(spec):
        return spec
    if "vp_stage" in inspect.signature(spec).parameters:
        return spec(config, vp_stage=vp_stage)
    return spec(config)


def default_moe_layer_spec(config, vp_stage=None, base_spec=None, dm_config: DefaultMoEConfig = None):
    """``base_spec`` (the spec or spec callable Bridge chose) resolved for ``config``, in Default
    MoE form. Bound with ``functools.partial(base_spec=..., dm_config=...)``."""
    return to_default_moe_spec(_resolve(base_spec, config, vp_stage), dm_config)


def wrap_layer_spec(spec, dm_config: DefaultMoEConfig):
    """``partial(default_moe_layer_spec, base_spec=spec, dm_config=dm_config)``; a spec wrapped
    before keeps its base and takes the new ``dm_config`` (no double wrapping)."""
    if isinstance(spec, functools.partial) and spec.func is default_moe_layer_spec:
        spec = spec.keywords.get("base_spec")
    return functools.partial(default_moe_layer_spec, base_spec=spec, dm_config=dm_config)


# -- megatron-core's GPTModelConfig (megatron.training.models.gpt) ------------------------------
def set_gpt_model_config(model_cfg, dm_config: DefaultMoEConfig) -> None:
    """Make a ``GPTModelConfig`` build Default MoE decoder and MTP layers, also after a reload."""
    metadata = dict(model_cfg.extra_checkpoint_metadata or {})
    metadata[METADATA_KEY] = dataclasses.asdict(dm_config)
    model_cfg.extra_checkpoint_metadata = metadata
    model_cfg.builder = f"{__name__}.DefaultMoEGPTModelBuilder"


def _gpt_model_builder():
    from megatron.training.models.gpt import GPTModelBuilder, default_layer_spec

    from megatron_default_moe.compat import gpt_builder_mtp_spec

    class DefaultMoEGPTModelBuilder(GPTModelBuilder):
        """``GPTModelBuilder`` with the Default MoE form of the decoder and MTP specs; the settings
        come from ``extra_checkpoint_metadata["default_moe"]`` (see ``set_gpt_model_config``)."""

        def build_model(self, pg_collection, pre_process=None, post_process=None, vp_stage=None):
            cfg = self._model_config
            dm_config = DefaultMoEConfig(**cfg.extra_checkpoint_metadata[METADATA_KEY])
            stock = cfg.transformer_layer_spec
            cfg.transformer_layer_spec = to_default_moe_spec(
                _resolve(stock if stock is not None else default_layer_spec, cfg, vp_stage), dm_config
            )
            try:
                with gpt_builder_mtp_spec(lambda spec: to_default_moe_spec(spec, dm_config)):
                    return super().build_model(pg_collection, pre_process, post_process, vp_stage)
            finally:
                cfg.transformer_layer_spec = stock

    DefaultMoEGPTModelBuilder.__module__ = __name__
    return DefaultMoEGPTModelBuilder


def __getattr__(name):  # the builder subclasses megatron.training's: built on first use
    if name == "DefaultMoEGPTModelBuilder":
        builder = _gpt_model_builder()
        globals()[name] = builder
        return builder
    raise AttributeError(name)
