"""Default MoE in Megatron-Bridge: one call after Bridge made the model config.

```python
from megatron_default_moe import DefaultMoEConfig
from megatron_default_moe.bridge import enable_default_moe

provider = AutoBridge.from_hf_pretrained(path).to_megatron_provider()   # or a recipe's cfg.model
callback = enable_default_moe(provider, DefaultMoEConfig(update="step"))
pretrain(cfg, forward_step, callbacks=[callback])
```

Nothing here imports Megatron-Bridge until a function runs. ``megatron_default_moe.bridge.cpu``
imports Bridge where Transformer Engine is absent (CPU tests, the CPU example).
"""

from megatron_default_moe.bridge.callbacks import DefaultMoECallback
from megatron_default_moe.bridge.conversion import hide_default_vectors
from megatron_default_moe.bridge.spec import default_moe_layer_spec
from megatron_default_moe.config import DefaultMoEConfig

__all__ = [
    "DefaultMoECallback",
    "default_moe_layer_spec",
    "enable_default_moe",
    "hide_default_vectors",
    "register_with_bridge",
    "require_default_moe_layers",
]


def register_with_bridge() -> None:
    """What a process needs before Bridge converts, builds or loads a Default MoE model
    (idempotent; ``enable_default_moe`` calls it; call it yourself before
    ``AutoBridge.load_megatron_model`` / ``load_megatron_model`` in a fresh process).

    * HF conversion skips ``default_vectors`` and the router maps as replicated (``conversion``);
    * ``run_config.yaml`` may name ``megatron_default_moe.*`` (Bridge's ``_target_`` allowlist);
    * a Megatron checkpoint without default vectors (TopK) loads with them at zero, said once.
    """
    from megatron.bridge.utils.instantiate_utils import register_allowed_target_prefix

    from megatron_default_moe.bridge.conversion import install_conversion_support
    from megatron_default_moe.checkpoint import load_checkpoints_without_default_vectors

    install_conversion_support()
    register_allowed_target_prefix("megatron_default_moe.")
    load_checkpoints_without_default_vectors()


def require_default_moe_layers(model):
    """Pre-wrap hook: every ``MoELayer`` of ``model`` (chunks) must be Default MoE; returns it.

    Catches MoE layers built outside the spec (Bridge re-derives the MTP layer spec from
    Megatron's defaults on a last pipeline stage without decoder layers)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_default_moe.layer import DefaultMoELayer

    chunks = model if isinstance(model, (list, tuple)) else [model]
    stock = [name for chunk in chunks for name, m in chunk.named_modules()
             if isinstance(m, MoELayer) and not isinstance(m, DefaultMoELayer)]  # fmt: skip
    if stock:
        raise ValueError(f"Default MoE: {len(stock)} MoE layer(s) were built without the Default MoE spec "
                         f"(e.g. {stock[0]}): {_likely_cause(stock)}")  # fmt: skip
    return model


def _likely_cause(stock_names) -> str:
    if all(".mtp." in f".{name}." for name in stock_names):
        return ("the MTP layers of a last pipeline stage without decoder layers, whose spec Bridge re-derives "
                "from Megatron's defaults; give that stage a decoder layer")
    return ("the model config's layer spec was most likely replaced after enable_default_moe (it wraps the "
            "spec it finds): set transformer_layer_spec, or apply a recipe's layer choices, first, then call "
            "enable_default_moe")


def enable_default_moe(model_config, dm_config: DefaultMoEConfig = None, callbacks=None) -> DefaultMoECallback:
    """Make the MoE layers of a Bridge model config Default MoE; returns the training callback.

    ``model_config``: a ``GPTModelProvider`` (``AutoBridge.to_megatron_provider()``, a recipe's
    ``cfg.model``) or megatron-core's ``GPTModelConfig``. Validates the Megatron options now
    (``DefaultMoEConfig.validate``: e.g. the ``flex`` dispatcher / DeepEP fail here, not when the
    model is built), wraps the spec Bridge chose (decoder and MTP layers), registers Default MoE
    with Bridge (``register_with_bridge``). Pass the returned ``DefaultMoECallback`` to
    ``pretrain(..., callbacks=[...])``, or give ``callbacks`` (a ``CallbackManager`` or a list)
    to add it there. Calling again replaces ``dm_config``.
    """
    from megatron_default_moe.bridge import conversion, spec

    dm_config = dm_config if dm_config is not None else DefaultMoEConfig()
    transformer_config = getattr(model_config, "transformer", model_config)
    if not hasattr(model_config, "transformer_layer_spec"):
        raise TypeError(
            f"enable_default_moe: expected a GPTModelProvider or GPTModelConfig, got {type(model_config).__name__}"
        )
    dm_config.validate(transformer_config)
    register_with_bridge()
    if hasattr(model_config, "transformer"):  # megatron.training.models.gpt.GPTModelConfig
        spec.set_gpt_model_config(model_config, dm_config)
        hooks = model_config.pre_wrap_hooks
    else:  # Bridge's GPTModelProvider
        model_config.transformer_layer_spec = spec.wrap_layer_spec(model_config.transformer_layer_spec, dm_config)
        hooks = getattr(model_config, "_pre_wrap_hooks", [])
    ours = [require_default_moe_layers]
    if any(conversion.loads_hf_weights(hook) for hook in hooks):
        ours.append(conversion.announce_hf_import)
    for hook in ours:
        if hook in hooks:
            continue
        if hasattr(model_config, "register_pre_wrap_hook"):
            model_config.register_pre_wrap_hook(hook)
        else:
            hooks.append(hook)
    callback = DefaultMoECallback()
    if callbacks is not None:
        callbacks.append(callback) if isinstance(callbacks, list) else callbacks.add(callback)
    return callback
