"""Default MoE in Megatron's ``HybridModel``: stack-spec rewriting, training against the stock twin,
step mode and checkpoints, on CPU.

Mamba layers need CUDA kernels, so the CPU model is built from a local (Transformer Engine-free)
hybrid stack spec of attention, dense MLP and MoE layers, pattern ``*E-E``. ``LOCAL_HYBRID_STACK_SPEC``
and its Default MoE form are module-level objects, as ``pretrain_hybrid.py --spec MODULE NAME``
wants them (``test_megatron_lm_hybrid.py`` passes this module).
"""

import dataclasses
import logging

import pytest
import torch
from helpers import moe_config
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import MoETransformerLayer, TransformerLayer
from reliability.gpt import SEQ, VOCAB, train

from megatron_default_moe import DefaultMoEConfig, DefaultMoELayer, DefaultMoERouter, default_moe_layers
from megatron_default_moe.spec import to_default_moe_spec

PATTERN = "*E-E"


def _local_hybrid_stack_spec():
    """Megatron's local GPT layer pieces arranged as a hybrid stack: no TE, no Mamba."""
    dense = get_gpt_layer_local_spec().submodules
    moe = get_gpt_layer_local_spec(num_experts=4).submodules
    no_mlp = dict(pre_mlp_layernorm=IdentityOp, mlp=IdentityOp, mlp_bda=IdentityFuncOp)
    no_attention = dict(input_layernorm=IdentityOp, self_attention=IdentityOp, self_attn_bda=IdentityFuncOp)
    return ModuleSpec(
        module=HybridStack,
        submodules=HybridStackSubmodules(
            attention_layer=ModuleSpec(module=TransformerLayer, submodules=dataclasses.replace(dense, **no_mlp)),
            mlp_layer=ModuleSpec(module=TransformerLayer, submodules=dataclasses.replace(dense, **no_attention)),
            moe_layer=ModuleSpec(module=MoETransformerLayer, submodules=dataclasses.replace(moe, **no_attention)),
        ),
    )


LOCAL_HYBRID_STACK_SPEC = _local_hybrid_stack_spec()
LOCAL_DEFAULT_MOE_HYBRID_STACK_SPEC = to_default_moe_spec(LOCAL_HYBRID_STACK_SPEC)


def hybrid_config(**overrides):
    return moe_config(**{"num_layers": len(PATTERN), "hidden_size": 16, "moe_router_topk": 1, **overrides})


def build_hybrid(config, spec, seed=0):
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    torch.manual_seed(seed)
    return HybridModel(
        config=config,
        hybrid_stack_spec=spec,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        hybrid_layer_pattern=PATTERN,
        position_embedding_type="rope",
    )


def twins(config, dm_config):
    """A stock hybrid model and its Default MoE twin with the same parameters."""
    stock = build_hybrid(config, LOCAL_HYBRID_STACK_SPEC)
    default = build_hybrid(config, to_default_moe_spec(LOCAL_HYBRID_STACK_SPEC, dm_config))
    missing, unexpected = default.load_state_dict(stock.state_dict(), strict=False)
    assert not unexpected and all(key.endswith("default_vectors") for key in missing)
    return stock, default


# -- spec ------------------------------------------------------------------------------------
def test_megatron_hybrid_stack_spec_gets_a_default_moe_layer_and_nothing_else_changes():
    from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec

    from megatron_default_moe.megatron_lm import hybrid_spec as hybrid_spec

    dm = DefaultMoEConfig(beta=0.95)
    new = to_default_moe_spec(hybrid_stack_spec, dm)
    old_subs, new_subs = hybrid_stack_spec.submodules, new.submodules
    mlp = new_subs.moe_layer.submodules.mlp
    assert mlp.func is DefaultMoELayer and mlp.keywords["dm_config"] is dm
    assert mlp.keywords["submodules"].router is DefaultMoERouter
    assert mlp.keywords["submodules"].experts is old_subs.moe_layer.submodules.mlp.keywords["submodules"].experts
    assert old_subs.moe_layer.submodules.mlp.func is MoELayer  # the input is not mutated
    for name in ("mamba_layer", "gdn_layer", "attention_layer", "dsa_layer", "mla_layer", "mlp_layer", "mtp_block_spec"):
        assert getattr(new_subs, name) is getattr(old_subs, name), name
    assert new_subs.moe_layer.submodules.pre_mlp_layernorm is old_subs.moe_layer.submodules.pre_mlp_layernorm
    # The zero-patch --spec object: the same rewrite with paper defaults.
    zero_patch = hybrid_spec.hybrid_stack_spec.submodules.moe_layer.submodules.mlp
    assert zero_patch.func is DefaultMoELayer and zero_patch.keywords["dm_config"] == DefaultMoEConfig()


def test_explicit_config_replaces_the_config_of_a_default_moe_spec():
    """The entry script's flags win over a ``--spec`` that is already Default MoE."""
    dm = DefaultMoEConfig(beta=0.5)
    again = to_default_moe_spec(LOCAL_DEFAULT_MOE_HYBRID_STACK_SPEC, dm)
    assert again.submodules.moe_layer.submodules.mlp.keywords["dm_config"] is dm
    assert to_default_moe_spec(LOCAL_DEFAULT_MOE_HYBRID_STACK_SPEC) is LOCAL_DEFAULT_MOE_HYBRID_STACK_SPEC


def test_moe_layer_subclasses_are_refused_by_name():
    class MyMoE(MoELayer):
        pass

    mlp = LOCAL_HYBRID_STACK_SPEC.submodules.moe_layer.submodules.mlp
    custom = ModuleSpec(module=MoETransformerLayer, submodules=dataclasses.replace(
        LOCAL_HYBRID_STACK_SPEC.submodules.moe_layer.submodules, mlp=mlp.__class__(MyMoE, **mlp.keywords)))
    with pytest.raises(ValueError, match="MyMoE"):
        to_default_moe_spec(custom)


# -- training --------------------------------------------------------------------------------
@pytest.mark.usefixtures("megatron_cpu")
@pytest.mark.parametrize(
    "topk,beta,update",
    [(4, 0.9, "microbatch"), (1, 1.0, "microbatch"), (1, 1.0, "step")],
    ids=["K=N", "beta=1", "beta=1-step"],
)
def test_hybrid_trains_bit_identical_to_its_stock_twin(topk, beta, update):
    stock, default = twins(hybrid_config(moe_router_topk=topk), DefaultMoEConfig(beta=beta, update=update))
    assert [type(layer.mlp).__name__ for layer in default.decoder.layers] == ["IdentityOp", "DefaultMoELayer", "MLP", "DefaultMoELayer"]
    ours = train(default, torch.optim.Adam(default.parameters(), lr=1e-2), steps=3)
    theirs = train(stock, torch.optim.Adam(stock.parameters(), lr=1e-2), steps=3)
    assert [float(x) for x in ours] == [float(x) for x in theirs]
    for (name, a), (_, b) in zip(default.named_parameters(), stock.named_parameters()):
        assert torch.equal(a, b), name
    tables = [layer.default_vectors for layer in default_moe_layers(default)]
    assert len(tables) == 2
    if beta == 1.0:
        assert all(not table.any() for table in tables)  # beta = 1 from zero: stays zero
    else:
        assert all(table.any() for table in tables)  # updated, but K = N leaves no default term


@pytest.mark.usefixtures("megatron_cpu")
def test_hybrid_default_moe_changes_training():
    """The twin test can fail: with beta < 1 and K < N the router sees the default term."""
    stock, default = twins(hybrid_config(), DefaultMoEConfig(beta=0.9))
    ours = train(default, torch.optim.SGD(default.parameters(), lr=0.1), steps=2)
    theirs = train(stock, torch.optim.SGD(stock.parameters(), lr=0.1), steps=2)
    assert ours != theirs
    router = default.decoder.layers[1].mlp.router.weight
    assert not torch.equal(router, stock.decoder.layers[1].mlp.router.weight)
    for layer in default_moe_layers(default):
        assert layer.default_vectors.any() and layer.default_vectors.dtype == torch.float32


# -- checkpoints -----------------------------------------------------------------------------
@pytest.mark.usefixtures("megatron_cpu")
def test_hybrid_checkpoint_round_trip_and_topk_warm_start(tmp_path, monkeypatch, caplog):
    from megatron.core import dist_checkpointing

    from megatron_default_moe.checkpoint import load_checkpoints_without_default_vectors

    stock, source = twins(hybrid_config(), DefaultMoEConfig(update="step"))
    train(source, torch.optim.SGD(source.parameters(), lr=0.1), steps=2)
    train(stock, torch.optim.SGD(stock.parameters(), lr=0.1), steps=1)
    (tmp_path / "default").mkdir()
    (tmp_path / "topk").mkdir()
    dist_checkpointing.save(source.sharded_state_dict(), str(tmp_path / "default"))
    dist_checkpointing.save(stock.sharded_state_dict(), str(tmp_path / "topk"))

    target = build_hybrid(hybrid_config(), to_default_moe_spec(LOCAL_HYBRID_STACK_SPEC), seed=1)
    target.load_state_dict(dist_checkpointing.load(target.sharded_state_dict(), str(tmp_path / "default")))
    for loaded, saved in zip(default_moe_layers(target), default_moe_layers(source)):
        assert torch.equal(loaded.default_vectors, saved.default_vectors) and saved.default_vectors.any()

    # A TopK checkpoint: Megatron's default strictness refuses the absent tables ...
    with pytest.raises(BaseException, match="default_vectors"):  # torch: CheckpointException
        dist_checkpointing.load(target.sharded_state_dict(), str(tmp_path / "topk"))
    # ... and loads them as zeros through the entry scripts' wrapper, with one log line.
    monkeypatch.setattr(dist_checkpointing, "load", dist_checkpointing.load)  # undone after the test
    load_checkpoints_without_default_vectors()
    caplog.clear()  # twins() logged its own warm start
    with caplog.at_level(logging.WARNING, logger="megatron_default_moe.checkpoint"):
        target.load_state_dict(dist_checkpointing.load(target.sharded_state_dict(), str(tmp_path / "topk")))
    lines = [r.getMessage() for r in caplog.records if "no default vectors" in r.getMessage()]
    assert len(lines) == 1, lines
    assert all(not layer.default_vectors.any() for layer in default_moe_layers(target))
    for (name, a), (_, b) in zip(target.named_parameters(), stock.named_parameters()):
        assert torch.equal(a, b), name
