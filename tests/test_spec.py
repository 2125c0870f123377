"""Spec rewriting: every MoE mlp becomes Default MoE, nothing else changes."""

import functools

import pytest
import torch
from helpers import moe_config

from megatron_default_moe import (
    DefaultMoEConfig,
    DefaultMoELayer,
    DefaultMoERouter,
    default_moe_spec,
)
from megatron_default_moe.spec import to_default_moe_spec

pytestmark = pytest.mark.usefixtures("megatron_cpu")


def block_spec(config):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    return get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="LayerNorm")


def test_block_spec_rewrites_moe_layers_only_and_shares_one_config():
    config = moe_config(num_layers=4, moe_layer_freq=[0, 1, 0, 1])
    original = block_spec(config)
    dm = DefaultMoEConfig(beta=0.95)
    rewritten = to_default_moe_spec(original, dm)
    kinds = []
    for before, after in zip(original.layer_specs, rewritten.layer_specs):
        mlp_before, mlp_after = before.submodules.mlp, after.submodules.mlp
        if isinstance(mlp_after, functools.partial) and mlp_after.func is DefaultMoELayer:
            kinds.append("moe")
            assert mlp_after.keywords["dm_config"] is dm
            assert mlp_after.keywords["submodules"].router is DefaultMoERouter
            assert mlp_after.keywords["submodules"].experts is mlp_before.keywords["submodules"].experts
        else:
            kinds.append("dense")
            assert mlp_after is mlp_before
        assert after.submodules.self_attention is before.submodules.self_attention
    assert kinds == ["dense", "moe", "dense", "moe"]
    assert all(b.submodules.mlp.func.__name__ == "MoELayer" for b in original.layer_specs[1::2])


def test_spec_hook_builds_a_gpt_model_with_default_moe_layers():
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.moe.moe_layer import MoELayer

    config = moe_config(num_layers=2, moe_layer_freq=[0, 1], transformer_impl="local")
    config.default_moe = DefaultMoEConfig(beta=0.8)
    spec = default_moe_spec(config)
    model = GPTModel(config, spec, vocab_size=64, max_sequence_length=16)
    mlps = [layer.mlp for layer in model.decoder.layers]
    assert not isinstance(mlps[0], MoELayer)
    assert isinstance(mlps[1], DefaultMoELayer) and mlps[1].dm_config.beta == 0.8
    tokens = torch.randint(0, 64, (2, 8))
    position_ids = torch.arange(8).expand(2, 8)
    loss = model(tokens, position_ids, None, labels=tokens)
    loss.sum().backward()
    assert mlps[1].default_vectors.any()
    assert model.decoder.layers[1].mlp.router.weight.grad is not None


def test_layer_spec_and_moduled_spec_forms():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.spec_utils import ModuleSpec

    layer_spec = get_gpt_layer_local_spec(num_experts=4)
    rewritten = to_default_moe_spec(layer_spec)
    assert rewritten.submodules.mlp.func is DefaultMoELayer
    assert layer_spec.submodules.mlp.func is MoELayer  # the input is not mutated
    old_style = ModuleSpec(module=MoELayer, submodules=layer_spec.submodules.mlp.keywords["submodules"])
    new = to_default_moe_spec(old_style)
    assert new.module is DefaultMoELayer and new.submodules.router is DefaultMoERouter
    assert isinstance(new.params["dm_config"], DefaultMoEConfig)


def test_spec_route_with_mtp_says_the_mtp_layers_stay_topk(caplog):
    """``--spec ... default_moe_spec`` cannot reach the MTP layers Megatron builds itself: it says so."""
    import logging

    config = moe_config(num_layers=2, moe_layer_freq=[0, 1], transformer_impl="local", mtp_num_layers=1)
    with caplog.at_level(logging.WARNING, logger="megatron_default_moe.spec"):
        default_moe_spec(config)
    assert any("--mtp-num-layers" in r.getMessage() for r in caplog.records)
    caplog.clear()
    config.default_moe = DefaultMoEConfig()  # the entry script's route rewrites the MTP spec itself
    with caplog.at_level(logging.WARNING, logger="megatron_default_moe.spec"):
        default_moe_spec(config)
    assert not caplog.records


def test_bridge_prewrap_check_names_the_likely_cause_of_stock_moe_layers():
    """``require_default_moe_layers``: a stock ``MoELayer`` in the decoder means the spec was
    replaced after ``enable_default_moe``; stock layers only under ``mtp`` mean Bridge's MTP spec on
    a last stage without decoder layers. Default MoE layers pass."""
    from helpers import build_layers, moe_config

    from megatron_default_moe.bridge import require_default_moe_layers

    stock, default = build_layers(moe_config())
    decoder = torch.nn.ModuleDict({"decoder": torch.nn.ModuleDict({"mlp": stock})})
    with pytest.raises(ValueError, match="decoder.mlp.*replaced after enable_default_moe"):
        require_default_moe_layers([decoder])
    mtp = torch.nn.ModuleDict({"decoder": torch.nn.ModuleDict({"mlp": default}),
                               "mtp": torch.nn.ModuleDict({"mlp": stock})})  # fmt: skip
    with pytest.raises(ValueError, match="mtp.mlp.*MTP layers of a last pipeline stage"):
        require_default_moe_layers(mtp)
    only_default = torch.nn.ModuleDict({"decoder": torch.nn.ModuleDict({"mlp": default})})
    assert require_default_moe_layers(only_default) is only_default
