"""Builders shared by the tests: a small MoE TransformerConfig and real Megatron MoE layers."""

import torch


def moe_config(**overrides):
    """A small fp32 MoE ``TransformerConfig`` in the paper's routing setting (softmax, pre-softmax)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(
        num_layers=1,
        hidden_size=16,
        num_attention_heads=4,
        num_moe_experts=4,
        moe_router_topk=2,
        moe_ffn_hidden_size=24,
        ffn_hidden_size=24,
        moe_token_dispatcher_type="alltoall",
        moe_router_pre_softmax=True,
        moe_router_score_function="softmax",
        moe_aux_loss_coeff=0.0,
        add_bias_linear=False,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def moe_submodules(num_experts, grouped_gemm=False):
    """``MoESubmodules`` of Megatron's local GPT layer spec (``SequentialMLP`` experts)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=grouped_gemm)
    return spec.submodules.mlp.keywords["submodules"]


def build_layers(config, dm_config=None, seed=0):
    """A stock ``MoELayer`` and a ``DefaultMoELayer`` with identical weights."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_default_moe import DefaultMoELayer

    subs = moe_submodules(config.num_moe_experts)
    torch.manual_seed(seed)
    stock = MoELayer(config, subs)
    torch.manual_seed(seed)
    default = DefaultMoELayer(config, subs, dm_config=dm_config)
    default.load_state_dict(stock.state_dict(), strict=False)
    return stock, default
