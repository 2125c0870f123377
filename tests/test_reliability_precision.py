"""Reliability: the default vectors and their statistics stay fp32 under bf16 / fp16.

``Float16Module`` casts every float buffer of the model it wraps (Megatron issue #1482 is the
same failure for the router's ``expert_bias``). The table must keep every fp32 bit through
wrapping, casts, forward, save and load.
"""

import pytest
import torch
from reliability.gpt import build_gpt, causal_mask, gpt_config, micro_batch

pytestmark = pytest.mark.usefixtures("megatron_cpu")

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _layers(model):
    from megatron_default_moe import default_moe_layers

    return default_moe_layers(model)


def _fp32_only_table(model, seed=0):
    """Random fp32 tables whose low mantissa bits a bf16/fp16 cast would lose; their clones."""
    gen = torch.Generator().manual_seed(seed)
    tables = []
    for layer in _layers(model):
        values = torch.randn(layer.default_vectors.shape, generator=gen) * (1 + 2**-20)
        assert not torch.equal(values.bfloat16().float(), values)
        layer.default_vectors.copy_(values)
        tables.append(values)
    return tables


def _assert_tables(model, expected):
    for layer, want in zip(_layers(model), expected, strict=True):
        assert layer.default_vectors.dtype == torch.float32
        assert layer.nonfinite_skips.dtype == torch.long
        assert torch.equal(layer.default_vectors, want)


def _wrapped(precision, update="microbatch", seed=0):
    """A Default MoE GPT (still fp32) and its ``precision`` config, ready for ``Float16Module``."""
    from megatron_default_moe import DefaultMoEConfig

    config = gpt_config(**{precision: True})
    model = build_gpt(config, DefaultMoEConfig(update=update), seed=seed)
    return model, config


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_float16_module_keeps_the_table_fp32_bit_exact(precision):
    from megatron.core.transformer.module import Float16Module

    model, config = _wrapped(precision)
    expected = _fp32_only_table(model)
    wrapped = Float16Module(config, model)
    assert wrapped.module.decoder.layers[0].mlp.router.weight.dtype == HALF[precision]
    _assert_tables(wrapped, expected)
    for name, buf in wrapped.named_buffers():
        if name.endswith("default_vectors"):
            assert buf.dtype == torch.float32, name


def test_cast_round_trips_lose_no_bits():
    model, _ = _wrapped("bf16")
    expected = _fp32_only_table(model)
    for cast in (
        lambda m: m.bfloat16(),
        lambda m: m.half(),
        lambda m: m.to(torch.bfloat16),
        lambda m: m.to(dtype=torch.float16),
        lambda m: m.double(),
        lambda m: m.float(),
        lambda m: m.to("cpu"),
    ):
        cast(model)
        _assert_tables(model, expected)
    assert model.decoder.layers[0].mlp.router.weight.dtype == torch.float32  # casts did apply


@pytest.mark.parametrize("update", ["microbatch", "step"])
def test_bf16_training_updates_the_table_in_fp32(update):
    from megatron.core.transformer.module import Float16Module

    from megatron_default_moe import update_default_vectors

    model, config = _wrapped("bf16", update=update)
    start = _fp32_only_table(model)
    wrapped = Float16Module(config, model)
    tokens, positions, labels = micro_batch(0)
    loss = wrapped(tokens, positions, causal_mask(), labels=labels).mean()
    assert loss.dtype == torch.float32  # Float16Module's fp32 output
    loss.backward()
    for layer in _layers(wrapped):
        if update == "step":  # statistics accumulated in fp32 for the step update
            assert layer._step_stats_EH1.dtype == torch.float32
    update_default_vectors(wrapped)
    for layer, before in zip(_layers(wrapped), start):
        assert layer.default_vectors.dtype == torch.float32
        assert torch.isfinite(layer.default_vectors).all()
        assert not torch.equal(layer.default_vectors, before)  # the EMA moved ...
        # ... by an fp32 step: the untouched experts (if any) keep their fp32-only bits.
        kept = ~layer.experts_updated
        assert torch.equal(layer.default_vectors[kept], before[kept])
        # β·Ê + (1-β)·m from an fp32 Ê is not a bf16 number.
        moved = layer.default_vectors[layer.experts_updated]
        assert not torch.equal(moved.bfloat16().float(), moved)


def test_save_and_load_under_float16_module_keep_fp32(tmp_path):
    from megatron.core import dist_checkpointing
    from megatron.core.transformer.module import Float16Module

    model, config = _wrapped("bf16")
    expected = _fp32_only_table(model)
    wrapped = Float16Module(config, model)

    state = wrapped.state_dict()
    for index, want in enumerate(expected):
        saved = state[f"decoder.layers.{index}.mlp.default_vectors"]
        assert saved.dtype == torch.float32 and torch.equal(saved, want)
    sharded = wrapped.sharded_state_dict()
    for index in range(len(expected)):
        assert sharded[f"decoder.layers.{index}.mlp.default_vectors"].dtype == torch.float32
    dist_checkpointing.save(sharded, str(tmp_path))

    other_model, _ = _wrapped("bf16", seed=1)
    other = Float16Module(config, other_model)
    other.load_state_dict(dist_checkpointing.load(other.sharded_state_dict(), str(tmp_path)))
    _assert_tables(other, expected)

    # A table stored in bf16 (e.g. by a tool that cast the whole state dict) loads into fp32.
    state = {k: (v.bfloat16() if k.endswith("default_vectors") else v) for k, v in state.items()}
    other.load_state_dict(state)
    _assert_tables(other, [t.bfloat16().float() for t in expected])
