"""The one place where megatron-core version differences are handled (supported: >= 0.19)."""

from megatron.core.extensions.transformer_engine import HAVE_TE
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

MIN_MEGATRON_CORE = (0, 19)


def transformer_config_of(model_config):
    """The ``TransformerConfig`` of a ``megatron.training`` ``GPTModelConfig`` or of itself."""
    return getattr(model_config, "transformer", model_config)


def gpt_decoder_block_spec(model_config, vp_stage=None):
    """Megatron's own GPT decoder block spec, chosen the way ``megatron.training`` chooses it."""
    config = transformer_config_of(model_config)
    if config.num_moe_experts is None:
        raise ValueError("Default MoE spec: --num-experts is not set (no MoE layer to modify)")
    use_te = config.transformer_impl == "transformer_engine"
    if use_te and not HAVE_TE:
        raise ValueError(
            "Default MoE spec: --transformer-impl transformer_engine but Transformer Engine is not "
            "importable; install it or pass --transformer-impl local"
        )
    return get_gpt_decoder_block_spec(
        config,
        use_transformer_engine=use_te,
        normalization=config.normalization,
        qk_l2_norm=config.qk_l2_norm,
        vp_stage=vp_stage,
    )


def check_megatron_core_version():
    """Raise ``ImportError`` on a megatron-core older than the supported minimum."""
    from megatron.core import __version__

    parts = tuple(int(p) for p in __version__.split(".")[:2])
    if parts < MIN_MEGATRON_CORE:
        raise ImportError(
            f"megatron-default-moe needs megatron-core >= {'.'.join(map(str, MIN_MEGATRON_CORE))}, "
            f"found {__version__}"
        )
