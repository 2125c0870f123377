"""The one place where megatron-core version differences are handled (supported: >= 0.19)."""

import contextlib
import re

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


# ``%%``, or a ``%(name)s``-style reference that argparse fills in; any other ``%`` is stray.
_HELP_FORMAT = re.compile(r"%%|%\([A-Za-z_]\w*\)[-#0 +]*\d*(?:\.\d+)?[diouxXeEfFgGcrsa%]|%")


def escape_stray_help_percents(parser) -> None:
    """Escape every ``%`` in ``parser``'s help strings that argparse cannot format.

    argparse formats each help string with ``%``; Megatron-LM core_v0.19.0 (and the 0.19.2
    wheel) has ``--moe-paged-stash-buffer-size-factor-cuda`` help ending in ``10%).``, so
    ``--help`` raises ``ValueError: unsupported format character``. Only help text changes.
    """
    for action in parser._actions:
        if isinstance(action.help, str) and "%" in action.help:
            action.help = _HELP_FORMAT.sub(lambda m: "%%" if m.group() == "%" else m.group(), action.help)


@contextlib.contextmanager
def gpt_builder_mtp_spec(transform):
    """While active, ``GPTModelBuilder.build_model`` passes its MTP block spec through ``transform``.

    Megatron's GPT builder makes the MTP spec from its own default layer specs
    (``megatron.training.models.gpt.mtp_block_spec``), whatever ``transformer_layer_spec`` says,
    and looks that function up by module-global name when it builds.
    """
    from megatron.training.models import gpt

    stock = gpt.mtp_block_spec
    gpt.mtp_block_spec = lambda *args, **kwargs: transform(stock(*args, **kwargs))
    try:
        yield
    finally:
        gpt.mtp_block_spec = stock


def expert_bias_padding_mask(padding_mask):
    """The padding mask ``TopKRouter._apply_expert_bias`` can take (``True``: a padded token).

    megatron-core 0.19 computes ``routing_map & ~padding_mask`` with a ``[T, E]`` map and a
    ``[T]`` mask, which raises unless ``T == E`` (and is wrong then), so expert bias with padding
    crashes even in the stock layer. A ``[T, 1]`` mask broadcasts over the experts as meant."""
    if padding_mask is not None and padding_mask.dim() == 1:
        return padding_mask.unsqueeze(-1)
    return padding_mask
