"""Reliability: activation recompute changes nothing but the work done.

With full (uniform / block) or selective (``moe``) recompute, a layer's forward runs twice per
micro-batch: under ``no_grad``, then again with grad inside backward. Losses, gradients and
default vectors must equal a run without recompute over several optimizer steps, in both update
modes, and the EMA must move once per micro-batch (``microbatch``) or once per step (``step``),
never once per pass. On CPU the shim's RNG stand-ins make recompute bit-identical, so the
comparisons are exact.
"""

import functools

import pytest
import torch
from reliability.gpt import build_gpt, gpt_config, train

pytestmark = pytest.mark.usefixtures("megatron_cpu")

STEPS, MICRO_BATCHES = 3, 2

RECOMPUTE = {
    "none": {},
    "full-uniform": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "full-block": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
    "selective-moe": dict(recompute_granularity="selective", recompute_modules=["moe"]),
}
RECOMPUTED_LAYERS = {"none": (), "full-uniform": (1, 2), "full-block": (1,), "selective-moe": (1, 2)}

# What each pass of a micro-batch does with the table (``DefaultMoELayer._phase``).
PASSES = {
    ("microbatch", False): ["update"],
    ("microbatch", True): ["update", "recompute"],  # update in the first pass, reuse in backward
    ("step", False): ["accumulate"],
    ("step", True): ["frozen", "accumulate"],  # statistics from the grad-enabled pass only
}


def _instrument(layer, phases, ema_steps):
    """Record every pass's phase and every EMA update of ``layer`` (instance-level wrappers)."""
    route, apply_ema = layer.route, layer.apply_ema

    def recording_route(*args, **kwargs):
        out = route(*args, **kwargs)
        phases.append(layer._phase)
        return out

    def counting_apply_ema(stats_EH1, *args):
        ema_steps.append(stats_EH1.clone())
        return apply_ema(stats_EH1, *args)

    layer.route, layer.apply_ema = recording_route, counting_apply_ema


@functools.cache
def _run(recompute, update, forwards_first=False):
    from megatron_default_moe import DefaultMoEConfig, default_moe_layers

    model = build_gpt(gpt_config(**RECOMPUTE[recompute]), DefaultMoEConfig(update=update), seed=0)
    layers = default_moe_layers(model)
    phases = {layer.layer_number: [] for layer in layers}
    ema_steps = {layer.layer_number: [] for layer in layers}
    for layer in layers:
        _instrument(layer, phases[layer.layer_number], ema_steps[layer.layer_number])
    grads, tables = [], []

    def record(model):
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        tables.append([layer.default_vectors.clone() for layer in layers])

    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = train(
        model, optimizer, STEPS, micro_batches=MICRO_BATCHES, on_step=record, forwards_first=forwards_first
    )
    return dict(losses=torch.stack(losses), grads=grads, tables=tables, phases=phases, ema=ema_steps)


@pytest.mark.parametrize("update", ["microbatch", "step"])
@pytest.mark.parametrize("recompute", ["full-uniform", "full-block", "selective-moe"])
def test_recompute_matches_no_recompute(recompute, update):
    got, want = _run(recompute, update), _run("none", update)
    for layer_number, phases in got["phases"].items():
        recomputed = layer_number in RECOMPUTED_LAYERS[recompute]
        assert phases == PASSES[(update, recomputed)] * (STEPS * MICRO_BATCHES), layer_number
    _assert_same_training(got, want, update)


@pytest.mark.parametrize("recompute", ["full-uniform", "selective-moe"])
def test_recompute_with_micro_batches_in_flight(recompute):
    """All forwards before the backwards (pipeline warm-up): each recompute must reuse the table
    of its own first pass, although later micro-batches have moved the EMA since."""
    got, want = _run(recompute, "microbatch", True), _run("none", "microbatch", True)
    _assert_same_training(got, want, "microbatch")


def _assert_same_training(got, want, update):
    """Same losses, gradients, tables and EMA statistics at every step; one EMA update per
    micro-batch (``microbatch``) or per step (``step``)."""
    assert torch.equal(got["losses"], want["losses"])
    for step, (got_grads, want_grads) in enumerate(zip(got["grads"], want["grads"], strict=True)):
        assert got_grads.keys() == want_grads.keys()
        for name in want_grads:
            assert torch.equal(got_grads[name], want_grads[name]), (step, name)
    for got_tables, want_tables in zip(got["tables"], want["tables"], strict=True):
        for got_table, want_table in zip(got_tables, want_tables, strict=True):
            assert torch.equal(got_table, want_table)

    updates = STEPS * MICRO_BATCHES if update == "microbatch" else STEPS
    for layer_number, stats in got["ema"].items():
        assert len(stats) == updates, layer_number  # once per micro-batch / step, not per pass
        for got_stats, want_stats in zip(stats, want["ema"][layer_number], strict=True):
            assert torch.equal(got_stats, want_stats)  # same statistics: counted once


def test_recompute_leaves_no_snapshot_behind():
    from megatron_default_moe import default_moe_layers

    model = build_gpt(gpt_config(**RECOMPUTE["full-uniform"]), seed=0)
    train(model, torch.optim.SGD(model.parameters(), lr=0.5), steps=1, micro_batches=2)
    assert all(not layer._recompute_snapshots for layer in default_moe_layers(model))
