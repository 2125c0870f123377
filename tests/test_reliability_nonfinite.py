"""Reliability: NaN/Inf expert outputs never reach the default vectors.

A NaN/Inf output row reaches the sums of its own expert only (the statistics op zeroes it for every
other expert, and the all-reduce adds other ranks' finite rows). Each expert with non-finite
statistics skips that EMA update
(its vector keeps its value), the layer's ``nonfinite_skips`` counts it, and
``report_nonfinite_skips`` (run once per step by ``update_default_vectors`` and the finalize
wrapper) logs a WARNING naming layer and experts. Experts that got no tokens keep their vector.
"""

import logging

import pytest
import torch
from helpers import build_layers, moe_config

pytestmark = pytest.mark.usefixtures("megatron_cpu")

UPDATE_LOGGER = "megatron_default_moe.update"
LAYER_NUMBER, POISONED, IDLE = 3, 1, 3  # layer 3; expert 1 emits NaN; expert 3 gets no tokens


def _layer(update):
    """One Default MoE layer (4 experts, top-2) with a known non-zero table, expert ``POISONED``
    returning NaN and expert ``IDLE`` never chosen for positive inputs."""
    from megatron_default_moe import DefaultMoEConfig

    _, layer = build_layers(moe_config(), DefaultMoEConfig(update=update))
    layer.set_layer_number(LAYER_NUMBER)
    with torch.no_grad():
        layer.default_vectors.copy_(torch.randn(4, 16, generator=torch.Generator().manual_seed(0)))
        layer.experts.local_experts[POISONED].linear_fc2.weight.fill_(float("nan"))
        layer.router.weight[IDLE].fill_(-10.0)
    return layer


def _forward_backward(layer, seed=0):
    x = torch.rand(8, 2, 16, generator=torch.Generator().manual_seed(seed), requires_grad=True)
    out, _ = layer(x)
    out.nansum().backward()
    return out


def _warnings(caplog):
    return [r for r in caplog.records if r.name == UPDATE_LOGGER and r.levelno == logging.WARNING]


@pytest.mark.parametrize("update", ["microbatch", "step"])
def test_nonfinite_expert_skips_its_update_and_is_reported_once(update, caplog):
    from megatron_default_moe import report_nonfinite_skips, update_default_vectors

    layer = _layer(update)
    before = layer.default_vectors.clone()
    with caplog.at_level(logging.INFO, logger=UPDATE_LOGGER):
        out = _forward_backward(layer)
        assert torch.isnan(out).any()  # the poisoned expert really emitted NaN
        assert not _warnings(caplog)  # nothing is read back per micro-batch
        update_default_vectors(layer)  # once per step

    table = layer.default_vectors
    assert torch.isfinite(table).all()
    for expert in range(4):  # the poisoned one skipped, the idle one kept, the others updated
        assert torch.equal(table[expert], before[expert]) == (expert in (POISONED, IDLE)), expert
    assert layer.nonfinite_skips.tolist() == [0, 1, 0, 0]
    assert layer.experts_updated.tolist() == [True, False, True, False]

    [record] = _warnings(caplog)
    message = record.getMessage()
    assert f"layer {LAYER_NUMBER}" in message and "expert(s) [1]" in message

    # Reported once: nothing new, no new line. A second poisoned step is reported again.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=UPDATE_LOGGER):
        assert report_nonfinite_skips(layer) == {}
        _forward_backward(layer, seed=1)
        update_default_vectors(layer)
    assert len(_warnings(caplog)) == 1
    assert layer.nonfinite_skips.tolist() == [0, 2, 0, 0]
    assert torch.isfinite(layer.default_vectors).all()


@pytest.mark.parametrize("update", ["microbatch", "step"])
def test_without_a_poisoned_expert_every_routed_expert_updates(update):
    from megatron_default_moe import update_default_vectors

    layer = _layer(update)
    with torch.no_grad():
        layer.experts.local_experts[POISONED].linear_fc2.weight.normal_()
    before = layer.default_vectors.clone()
    _forward_backward(layer)
    update_default_vectors(layer)
    assert torch.equal(layer.default_vectors[IDLE], before[IDLE])
    for expert in {0, 1, 2}:
        assert not torch.equal(layer.default_vectors[expert], before[expert])
    assert layer.experts_updated.tolist() == [True, True, True, False] and not layer.nonfinite_skips.any()


def test_finalize_wrapper_reports_skips(caplog):
    from megatron_default_moe import wrap_finalize_model_grads

    layer = _layer("microbatch")
    calls = []
    config = layer.config
    config.finalize_model_grads_func = lambda model, *args, **kwargs: calls.append(model)
    try:
        wrap_finalize_model_grads(config)
        with caplog.at_level(logging.INFO, logger=UPDATE_LOGGER):
            _forward_backward(layer)
            config.finalize_model_grads_func([layer])
    finally:
        config.finalize_model_grads_func = None
    assert calls == [[layer]]
    [record] = _warnings(caplog)
    assert f"layer {LAYER_NUMBER}" in record.getMessage()


def test_inf_statistics_are_skipped_like_nan():
    from megatron_default_moe import report_nonfinite_skips

    layer = _layer("microbatch")
    expert = layer.experts.local_experts[POISONED]
    with torch.no_grad():
        expert.linear_fc2.weight.normal_()  # finite again: an Inf weight gives inf - inf = NaN
    expert.register_forward_hook(lambda module, args, out: (out[0] + float("inf"), *out[1:]))  # +Inf rows
    before = layer.default_vectors.clone()
    out = _forward_backward(layer)
    assert torch.isinf(out).any() and not torch.isnan(out).any()  # the statistics really are Inf
    assert torch.equal(layer.default_vectors[POISONED], before[POISONED])
    assert report_nonfinite_skips(layer) == {LAYER_NUMBER: [POISONED]}
