"""``enable_default_moe`` on configs alone (``hf_flow.py`` runs it in its process after the round
trip, sharing the imports; writes ``OUT_DIR/api_checks.json``): rejected options fail at
once, the wrapped spec is a ``partial`` of a module-level function (what ``run_config.yaml``
can name; ``hf_flow.py`` saves and reloads one), and megatron-core's
``GPTModelConfig`` builds Default MoE decoder *and* MTP layers, also after its own
``as_dict`` / ``from_dict`` round trip. Real Megatron-Bridge and megatron-core throughout; the
TE stand-in is the one described in ``tests/bridge/hf_flow.py``.
"""

import json
import os

import torch


def tiny_gpt_model_config(mtp_num_layers=None):
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.training.models.gpt import GPTModelConfig

    transformer = TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
        num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=16, moe_token_dispatcher_type="alltoall",
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True, moe_aux_loss_coeff=0.0,
        add_bias_linear=False, use_cpu_initialization=True, params_dtype=torch.float32,
        transformer_impl="local", mtp_num_layers=mtp_num_layers, normalization="RMSNorm",
    )  # fmt: skip
    return GPTModelConfig(transformer=transformer, vocab_size=64, seq_length=16, position_embedding_type="rope")


def error_of(fn):
    try:
        fn()
    except (ValueError, TypeError) as e:
        return str(e)
    return None


def main(out_dir):
    """Expects gloo + Megatron's groups and ``megatron.bridge`` imported (``hf_flow.py`` runs it)."""
    from megatron.bridge.models.gpt_provider import GPTModelProvider, local_layer_spec
    from megatron.bridge.training.callbacks import CallbackManager
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.training.models.base import ModelConfig

    from megatron_default_moe import DefaultMoEConfig, DefaultMoELayer
    from megatron_default_moe.bridge import enable_default_moe

    r = {}

    def provider(**overrides):
        kwargs = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, num_moe_experts=4,
                      moe_router_topk=2, moe_ffn_hidden_size=16, moe_token_dispatcher_type="alltoall",
                      vocab_size=64, transformer_layer_spec=local_layer_spec)  # fmt: skip
        kwargs.update(overrides)
        return GPTModelProvider(**kwargs)

    # Rejected Megatron options fail in enable_default_moe, naming the flag.
    r["flex_error"] = error_of(lambda: enable_default_moe(provider(moe_token_dispatcher_type="flex")))
    r["no_moe_error"] = error_of(lambda: enable_default_moe(provider(num_moe_experts=None)))
    r["not_a_config_error"] = error_of(lambda: enable_default_moe(object()))

    # The wrapped spec: a partial of a module-level function, vp_stage passed through, serialisable.
    p = provider()
    manager = CallbackManager()
    callback = enable_default_moe(p, DefaultMoEConfig(beta=0.7), callbacks=manager)
    enable_default_moe(p, DefaultMoEConfig(beta=0.8))  # again: replaces dm_config, no double wrap
    spec_fn = p.transformer_layer_spec
    r["spec_fn"] = f"{spec_fn.func.__module__}.{spec_fn.func.__qualname__}"
    r["base_spec"] = spec_fn.keywords["base_spec"].__name__
    r["beta"] = spec_fn.keywords["dm_config"].beta
    r["callback_registered"] = manager.list_callbacks("on_train_step_end") == [callback.on_train_step_end]
    spec = spec_fn(p, vp_stage=None)  # what provide() and mtp_block_spec() call
    r["spec_mlp"] = spec.submodules.mlp.func.__name__

    # GPTModelConfig: decoder and MTP layers, before and after as_dict / from_dict.
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    for name, cfg in (("gpt_config", tiny_gpt_model_config(mtp_num_layers=1)),):
        enable_default_moe(cfg, DefaultMoEConfig(beta=0.6))
        for label, c in ((name, cfg), (name + "_reloaded", ModelConfig.from_dict(cfg.as_dict()))):
            c.finalize()
            model = c.get_builder_cls()(c).build_model(pgs, pre_process=True, post_process=True)
            moe = [m for m in model.modules() if type(m).__name__.endswith("MoELayer")]
            r[label] = {
                "builder": c.builder,
                "moe_layers": len(moe),
                "all_default": all(isinstance(m, DefaultMoELayer) for m in moe),
                "mtp_default": any(isinstance(m, DefaultMoELayer) for n, m in model.named_modules() if n.startswith("mtp")),
                "beta": moe[0].dm_config.beta if moe else None,
            }
    with open(os.path.join(out_dir, "api_checks.json"), "w") as f:
        json.dump(r, f, indent=1)
    print(json.dumps(r, indent=1))
