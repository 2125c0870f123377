"""Probes (``estimators/probes.py``, ``DESIGN.md`` §1.7) on one rank, on a real ``MoELayer``: they change
nothing but the default vectors (output, aux and z losses, expert-bias counts, every gradient;
router replay is rejected by Default MoE as a whole), and the vectors follow an independent reference of the unchosen-pair mean.

Two layers with identical weights run the same micro-batches, one without probes and one with a
budget; everything but the default vectors must match. The first update's vectors are
``(1-β)`` times the mean of ``E_i(x_t)`` over the drawn pairs, with ``E_i`` run token by token.
"""

import itertools

import pytest
import torch
from helpers import moe_config, moe_submodules
from test_routers import FAMILIES

from megatron_default_moe import DefaultMoEConfig, DefaultMoELayer
from megatron_default_moe.estimators import probes as P
from megatron_default_moe.ops import probe_draw as D
from megatron_default_moe.ops.strata import TokenLayout, probe_strata

pytestmark = pytest.mark.usefixtures("megatron_cpu")

ROUTERS = {
    "paper": dict(num_moe_experts=8, moe_router_topk=1, moe_z_loss_coeff=1e-3),
    "mixtral": {**FAMILIES["mixtral"], "moe_z_loss_coeff": 1e-3, "moe_router_load_balancing_type": "global_aux_loss"},
    "deepseek_v3": {**FAMILIES["deepseek_v3"], "moe_z_loss_coeff": 1e-3},
}


def twin_layers(router, dispatcher, budget, draw="uniform", update="microbatch", beta=0.5, fit="constant",
                **overrides):  # fmt: skip
    config = moe_config(
        **{**ROUTERS[router], "moe_token_dispatcher_type": dispatcher, "moe_aux_loss_coeff": 1e-2, **overrides}
    )
    subs = moe_submodules(config.num_moe_experts)
    layers = []
    for probes in (0, budget):
        torch.manual_seed(0)
        dm = DefaultMoEConfig(beta=beta, update=update, probes=probes, probe_draw=draw, probe_seed=7,
                              fit=fit if probes else "constant")  # fmt: skip
        layers.append(DefaultMoELayer(config, subs, dm_config=dm))
    layers[1].load_state_dict(layers[0].state_dict())
    for layer in layers:
        layer.set_layer_number(1)  # Megatron records aux losses per layer number
    return layers


def step(layer, x_SBH, grad_SBH):
    """One training micro-batch: output, input gradient, all parameter gradients, aux losses."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

    clear_aux_losses_tracker()
    layer.zero_grad(set_to_none=True)
    x = x_SBH.clone().requires_grad_()
    out, _ = layer(x)
    out.backward(grad_SBH)
    losses = {k: v["values"].clone() for k, v in get_moe_layer_wise_logging_tracker().items()}
    grads = {name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads, losses


def fp32_close(a, b):
    """Equal up to fp32 summation order: within 2^-20 of the tensor's scale."""
    return bool((a - b).abs().max() <= 2.0**-20 * b.abs().max())


@pytest.mark.parametrize("dispatcher", ["allgather", "alltoall"])
@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_probes_change_nothing_but_the_default_vectors(router, dispatcher):

    """β = 1 keeps both layers' vectors at zero, so both are TopK in value and gradient: only the
    probe rows differ, and they must leave no trace. (The experts' GEMMs see more rows, which may
    change their blocking, so values agree to fp32 rounding, not always bit for bit.)"""
    plain, probed = twin_layers(router, dispatcher, budget=24, beta=1.0)
    torch.manual_seed(3)
    for _ in range(3):
        x = torch.randn(6, 2, 16)
        g = torch.randn(6, 2, 16)
        out0, dx0, grads0, losses0 = step(plain, x, g)
        out1, dx1, grads1, losses1 = step(probed, x, g)
        assert probed.probes.last_probes_TE.sum() > 0
        assert fp32_close(out1, out0) and fp32_close(dx1, dx0)
        assert grads0.keys() == grads1.keys()
        for name in grads0:  # expert weights and the router: up to fp32 summation order
            assert fp32_close(grads1[name], grads0[name]), name
        assert losses0.keys() == losses1.keys() and {"load_balancing_loss", "z_loss"} <= losses0.keys()
        for name in losses0:
            assert torch.equal(losses0[name], losses1[name]), name
        if plain.router.expert_bias is not None:
            assert torch.equal(plain.router.local_tokens_per_expert, probed.router.local_tokens_per_expert)
    probed.dm_config.beta = plain.dm_config.beta = 0.5  # and the probe rows did reach the statistics
    step(plain, x, g)
    step(probed, x, g)
    assert not torch.equal(plain.default_vectors, probed.default_vectors)


def expert_outputs_TEH(layer, x_TH):
    """``E_i(x_t)`` for every token and expert, token by token (the local ``SequentialMLP``)."""
    outs = []
    for expert in layer.experts.local_experts:
        out, _ = expert(x_TH)
        outs.append(out)
    return torch.stack(outs, dim=1).detach()


@pytest.mark.parametrize("draw", P.PROBE_DRAWS)
@pytest.mark.parametrize("router", ["paper", "mixtral"])
def test_vectors_follow_the_drawn_unchosen_pairs(router, draw):
    """Uniform: the mean of ``E_i(x_t)`` over the drawn pairs; weighted: weighted by ``W_t``."""
    _, layer = twin_layers(router, "alltoall", budget=10, draw=draw)
    torch.manual_seed(5)
    x = torch.randn(6, 2, 16)
    step(layer, x, torch.randn(6, 2, 16))
    tokens_B, experts_B, probs_B, _ = layer.probes.last_probes
    assert len(set(tokens_B.tolist())) == 6 and (probs_B < 0).all()  # budget 10 of 12 tokens: strata of 2
    with torch.no_grad():
        o_TEH = expert_outputs_TEH(layer, x.reshape(-1, 16))
        _, routing_map_TE = layer.router(x)  # same weights: the same selection
        w_TE = layer.router.default_weights
    assert not routing_map_TE[tokens_B, experts_B].any(), "a probe pair was one the router chose"
    if draw == "weighted":
        torch.testing.assert_close(-probs_B, w_TE[tokens_B].sum(-1))
    weight_B = -probs_B
    sums_EH = torch.zeros(8, 16).index_add_(0, experts_B, o_TEH[tokens_B, experts_B] * weight_B[:, None])
    counts_E = torch.zeros(8).index_add_(0, experts_B, weight_B)
    expected_EH = sums_EH / counts_E.clamp_min(1e-30)[:, None] * 0.5
    expected_EH[counts_E == 0] = 0.0
    torch.testing.assert_close(layer.default_vectors, expected_EH, rtol=1e-5, atol=1e-6)


def _draw(w_TE, routed_TE, seed, draw, m=1):
    """One layout-free draw over ``T`` tokens of one sample (``stride`` 1)."""
    strata_B4 = torch.tensor(probe_strata(TokenLayout(), w_TE.shape[0], 1, m)).view(-1, 4)
    return D.draw_probes(w_TE, routed_TE, strata_B4, m, 1, seed, draw)


def test_draws_are_reproducible_distinct_unrouted_and_weighted_draws_follow_w():
    w_TE = torch.rand(64, 8)
    routed_TE = torch.zeros(64, 8, dtype=torch.bool)
    routed_TE[:, 0] = True
    w_TE[routed_TE] = 0.0
    w_TE[5] = 0.0  # a padding token: a filler if drawn
    seed = D.probe_seed(1, 2, 3, 4)
    blocked_TE = w_TE == 0  # uniform draws read which pairs have weight 0, not w
    t, e, p = _draw(blocked_TE, routed_TE, seed, "uniform")
    assert all(torch.equal(a, b) for a, b in zip((t, e, p), _draw(blocked_TE, routed_TE, seed, "uniform")))
    assert not torch.equal(e, _draw(blocked_TE, routed_TE, seed + 1, "uniform")[1])
    assert sorted(t.tolist()) == list(range(64))  # strata of one token: every token once
    assert not routed_TE[t, e].any() and (w_TE[t, e] > 0).sum() == 63
    assert p[t == 5].item() == 0.0 and (p[t != 5] == P.PROBE_PROB).all()  # the filler runs uncounted
    t4 = _draw(blocked_TE, routed_TE, seed, "uniform", m=4)[0]  # strata of 4: one token in each
    assert torch.equal(t4 // 4, torch.arange(16)) and len(set((t4 % 4).tolist())) > 1
    # uniform: every eligible pair equally likely; weighted: within a token, in proportion to w
    w_TE = torch.tensor([[1.0, 0.1, 0.0, 1.0, 0.0]] * 2)
    routed_TE = torch.zeros(2, 5, dtype=torch.bool)
    routed_TE[:, 4] = True
    hits = {draw: torch.zeros(5) for draw in P.PROBE_DRAWS}
    for k in range(400):
        for draw in P.PROBE_DRAWS:
            t, e, p = _draw(w_TE if draw == "weighted" else w_TE == 0, routed_TE, D.probe_seed(k, 0, 0, 0), draw)
            hits[draw] += torch.bincount(e, minlength=5)
            if draw == "weighted":
                assert torch.allclose(p, torch.full_like(p, -2.1))  # -W_t
    assert hits["uniform"][2] == hits["uniform"][4] == hits["weighted"][2] == hits["weighted"][4] == 0
    assert (hits["uniform"][:2] - 800 / 3).abs().max() < 60 and abs(hits["uniform"][3] - 800 / 3) < 60
    expected = torch.tensor([1.0, 0.1, 0.0, 1.0, 0.0]) / 2.1 * 800  # ± 4 binomial deviations
    assert ((hits["weighted"] - expected).abs() <= 4 * (expected * (1 - expected / 800)).sqrt() + 1e-6).all()


def test_a_stratum_takes_each_of_its_tokens_alike():
    """The token within a stratum of ``m`` is uniform (each token of the batch drawn with
    probability ``1 / m``), and the two keys are independent of each other."""
    routed_TE = torch.zeros(12, 4, dtype=torch.bool)
    routed_TE[:, 0] = True
    hits, pairs = torch.zeros(12), torch.zeros(3, 3)
    for k in range(600):
        t, e, _ = _draw(routed_TE, routed_TE, D.probe_seed(k, 1, 2, 0), "uniform", m=3)
        hits += torch.bincount(t, minlength=12)
        pairs[t[0], e[0] - 1] += 1
    assert ((hits - 200).abs() < 4 * (200 * 2 / 3) ** 0.5).all(), hits
    assert ((pairs - 600 / 9).abs() < 4 * (600 / 9 * 8 / 9) ** 0.5).all(), pairs


@pytest.mark.parametrize("m", [1, 3, 5, 7])
def test_every_layout_of_the_global_batch_draws_the_same_pairs(m):
    """Megatron's cut (data parallel by sample, context parallel in 2·CP load-balanced chunks,
    sequence parallel within): the ranks' probes together are the one-rank draw, pair for pair,
    with no pair twice; strata cut by a rank boundary run a filler on the rank without the token."""
    S, B, E = 24, 4, 8
    gen = torch.Generator().manual_seed(m)
    routed_SBE = torch.rand(S, B, E, generator=gen).argsort(-1) < 2  # top-2 of 8
    blocked_SBE = routed_SBE.clone()
    blocked_SBE[3, 1] = True  # a padding token: no probe under any layout
    seed = D.probe_seed(1, 2, 3, 0)

    def probes_of(layout, dp, seq_local):
        b = B // dp
        positions = torch.empty(seq_local, dtype=torch.long)
        for local, glob, n in layout.segments(seq_local):
            positions[local : local + n] = torch.arange(glob, glob + n)
        samples = slice(layout.dp_rank * b, (layout.dp_rank + 1) * b)
        strata_B4 = torch.tensor(probe_strata(layout, seq_local, b, m)).view(-1, 4)
        mine = lambda t_SBE: t_SBE[positions][:, samples].reshape(-1, E)  # noqa: E731
        t, e, p = D.draw_probes(mine(blocked_SBE), mine(routed_SBE), strata_B4, m, b, seed, "uniform")
        return {(int(positions[i // b]), layout.dp_rank * b + int(i % b), int(x)) for i, x in zip(t[p < 0], e[p < 0])}

    one_rank = probes_of(TokenLayout(), 1, S)
    assert (S // m) * B - 1 <= len(one_rank) <= -(-S // m) * B  # a padding token; short last strata may miss
    for dp, cp, sp in [(2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 2), (1, 3, 2), (4, 1, 1), (1, 2, 3)]:
        drawn = []
        for d, c, q in itertools.product(range(dp), range(cp), range(sp)):
            drawn += probes_of(TokenLayout(d, c, cp, q, sp), dp, S // (cp * sp))
        assert len(drawn) == len(set(drawn)) and set(drawn) == one_rank, (dp, cp, sp)


@pytest.mark.parametrize("cp, sp", [(2, 1), (3, 1), (2, 2), (2, 3)])
def test_token_layout_is_megatrons_cut(monkeypatch, cp, sp):
    """``TokenLayout.segments`` against Megatron's own context-parallel split
    (``megatron.core.utils.get_batch_on_this_cp_rank``, load-balanced 2·CP chunks), then sequence
    parallelism's contiguous pieces: each rank's sequence positions, in its local order."""
    from megatron.core import utils

    S = 24
    positions = torch.arange(S)[None, :]  # [micro-batch, sequence]: the global positions
    for cp_rank in range(cp):
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: cp)
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None, r=cp_rank: r)
        batch = utils.get_batch_on_this_cp_rank({"tokens": positions.clone(), "cu_seqlens": None}, False)
        for sp_rank, want in enumerate(batch["tokens"][0].chunk(sp)):
            runs = TokenLayout(cp_rank=cp_rank, cp=cp, sp_rank=sp_rank, sp=sp).segments(S // (cp * sp))
            got = torch.cat([torch.arange(glob, glob + n) for _, glob, n in runs])
            assert [local for local, _, _ in runs] == [sum(n for _, _, n in runs[:i]) for i in range(len(runs))]
            assert torch.equal(got, want), (cp_rank, sp_rank, runs)


def test_uniform_keys_are_uniform_and_a_pure_function_of_the_seed():
    u = D.uniform_keys(1 << 16, D.probe_seed(5, 6, 7, 8), "cpu")
    assert torch.equal(u, D.uniform_keys(1 << 16, D.probe_seed(5, 6, 7, 8), "cpu"))
    assert 0.0 < float(u.min()) and float(u.max()) < 1.0
    counts = torch.histc(u, bins=16, min=0.0, max=1.0)  # 4096 expected per bin
    assert float((counts - 4096).abs().max()) < 300
    assert abs(float(u[1:].mul(u[:-1]).mean()) - 0.25) < 0.005  # neighbours uncorrelated
    v = D.uniform_keys(1 << 16, D.probe_seed(5, 6, 7, 9), "cpu")
    assert float((u - v).abs().mean()) > 0.3  # another token set: other keys
    h = D.hashed_keys(torch.arange(1 << 16) * 2, D.probe_seed(5, 6, 7, 8))  # the strata's keys
    counts = torch.histc(h.double() / 2**32, bins=16, min=0.0, max=1.0)
    assert float((counts - 4096).abs().max()) < 300 and 0 <= int(h.min()) and int(h.max()) < 2**32


def test_counter_is_checkpointed_and_resumes_the_same_draws():
    _, layer = twin_layers("mixtral", "alltoall", budget=8)
    _, twin = twin_layers("mixtral", "alltoall", budget=8)
    x, g = torch.randn(6, 2, 16), torch.randn(6, 2, 16)
    step(layer, x, g)
    state = layer.state_dict()
    assert int(state["sample_counter"]) == 1
    twin.load_state_dict(state)
    assert twin._stats_updates == 1
    step(layer, x, g)
    step(twin, x, g)
    assert torch.equal(layer.probes.last_probes_TE, twin.probes.last_probes_TE)
    assert torch.equal(layer.default_vectors, twin.default_vectors)
    old = {k: v for k, v in state.items() if k != "sample_counter"}  # a 0.1 checkpoint (the counter came in 0.2)
    twin.load_state_dict(old)
    assert twin._stats_updates == 0


@pytest.mark.parametrize(
    "override, flag",
    [
        (dict(moe_expert_capacity_factor=1.0), "--moe-expert-capacity-factor"),
        (dict(moe_token_dispatcher_type="flex"), "--moe-token-dispatcher-type"),
    ],
)
def test_probes_reject_what_they_cannot_hold(override, flag):
    config = moe_config(**override) if "flex" not in str(override) else moe_config()
    if "flex" in str(override):
        config.moe_token_dispatcher_type = "flex"
    with pytest.raises(ValueError, match=flag):
        DefaultMoEConfig(probes=4).validate(config)
    with pytest.raises(ValueError, match="--moe-default-probes"):
        DefaultMoEConfig(probes=-1)
    with pytest.raises(ValueError, match="--moe-default-stats-stride"):
        DefaultMoEConfig(probes=4, stats_stride=4)
    with pytest.raises(ValueError, match="--moe-default-ema-weighting 'router'"):
        DefaultMoEConfig(probes=4, ema_weighting="router")


def test_probes_take_no_statistics_of_the_routed_rows(monkeypatch):
    """The vectors follow the probes alone: the routed rows' statistics pass (a read of the whole
    ``[rows, H]`` expert output) is not run, and the table all-reduced is ``[E, H+1]``."""
    import megatron_default_moe.estimators.routed_rows as L

    _, layer = twin_layers("mixtral", "alltoall", budget=6)

    def not_called(*args, **kwargs):
        raise AssertionError("the routed rows' statistics were taken with probes on")

    monkeypatch.setattr(L, "expert_output_stats_EH1", not_called)
    torch.manual_seed(5)
    step(layer, torch.randn(6, 2, 16), torch.randn(6, 2, 16))
    assert layer._stats_updates == 1 and layer.default_vectors.abs().sum() > 0
    layer.dm_config.update = "step"
    step(layer, torch.randn(6, 2, 16), torch.randn(6, 2, 16))
    assert layer.take_step_stats().shape == (8, 17)


@pytest.mark.parametrize("update", ["microbatch", "step"])
def test_recompute_and_step_mode_with_probes(update):
    """Megatron's MoE recompute: the first (no-grad) pass draws, runs and counts the probes, the
    recompute pass runs none; outputs and gradients match a run without recompute to fp32
    rounding (the GEMMs see other row counts), the vectors bit for bit."""
    from megatron_default_moe import update_default_vectors

    plain, probed = twin_layers("mixtral", "alltoall", budget=16, update=update)
    _, recomputed = twin_layers(
        "mixtral", "alltoall", budget=16, update=update, recompute_granularity="selective", recompute_modules=["moe"]
    )
    recomputed.load_state_dict(probed.state_dict())
    assert recomputed.moe_layer_recompute
    torch.manual_seed(11)
    for _ in range(3):
        x, g = torch.randn(6, 2, 16), torch.randn(6, 2, 16)
        results = [step(layer, x, g) for layer in (plain, probed, recomputed)]
        if update == "step":
            for layer in (plain, probed, recomputed):
                update_default_vectors(layer)
        (out_p, dx_p, grads_p, _), (out_r, dx_r, grads_r, _) = results[1], results[2]
        assert fp32_close(out_r, out_p) and fp32_close(dx_r, dx_p)
        for name in grads_p:
            assert fp32_close(grads_r[name], grads_p[name]), name
        assert torch.equal(probed.default_vectors, recomputed.default_vectors)
        assert probed._stats_updates == recomputed._stats_updates
    assert probed.default_vectors.any() and not torch.equal(plain.default_vectors, probed.default_vectors)


def test_auto_budget_follows_the_rule_and_is_off_where_probes_do_not_help_or_hold():
    """``--moe-default-probes auto``: ``ceil(8 E / token sets)`` per rank for every router family;
    off (no sampler, no error) where probes cannot run; the flag parses ``auto`` and rejects other
    words by name."""
    import argparse

    from megatron_default_moe.megatron_lm.arguments import add_default_moe_args, default_moe_config_from_args

    assert P.auto_probe_budget(128, 8) == 128 and P.auto_probe_budget(256, 64 * 16) == 2
    assert P.auto_probe_budget(8, 1000) == 1
    auto = DefaultMoEConfig(probes="auto")
    for router in ("mixtral", "deepseek_v3", "paper"):
        config = moe_config(**ROUTERS[router])
        layer = DefaultMoELayer(config, moe_submodules(config.num_moe_experts), dm_config=auto)
        assert layer.probes is not None and layer.probes.budget == 8 * config.num_moe_experts, router
    capped = moe_config(**ROUTERS["mixtral"], moe_expert_capacity_factor=1.0)
    budget, why = auto.resolved_probes(capped)
    assert budget == 0 and "--moe-expert-capacity-factor" in why
    assert DefaultMoELayer(capped, moe_submodules(8), dm_config=auto).probes is None
    assert DefaultMoEConfig(probes="auto", stats_stride=4).resolved_probes(moe_config(**ROUTERS["mixtral"]))[0] == 0
    with pytest.raises(ValueError, match="'auto'"):
        DefaultMoEConfig(probes="some")
    parser = add_default_moe_args(argparse.ArgumentParser(allow_abbrev=False))
    args = parser.parse_args(["--moe-default-vectors", "--moe-default-probes", "auto"])
    assert default_moe_config_from_args(args).probes == "auto"
    assert default_moe_config_from_args(parser.parse_args(["--moe-default-vectors", "--moe-default-probes", "3"])).probes == 3
    with pytest.raises(SystemExit):
        parser.parse_args(["--moe-default-probes", "many"])
