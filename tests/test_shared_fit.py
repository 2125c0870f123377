"""``--moe-default-fit shared-1`` (``estimators/shared_fit.py``): the math against independent references, and
on one rank on a real ``MoELayer``: the tables follow the drawn unchosen pairs, the term uses
them, nothing but the router gradient changes, recompute / step mode / checkpoints hold."""

import logging

import pytest
import torch
from test_probes import expert_outputs_TEH, fp32_close, step, twin_layers

from megatron_default_moe import DefaultMoEConfig, DefaultMoELayer
from megatron_default_moe import functional as F
from megatron_default_moe.ops import fit as FO
from megatron_default_moe.estimators import shared_fit as S

pytestmark = pytest.mark.usefixtures("megatron_cpu")


def fit_twins(router="mixtral", budget=12, fit_beta=None, **overrides):
    """A probed layer with the constant default and one with ``shared-1``, identical weights."""
    plain, constant = twin_layers(router, "alltoall", budget=budget, **overrides)
    dm = DefaultMoEConfig(**{**constant.dm_config.__dict__, "fit": "shared-1", "fit_beta": fit_beta})
    torch.manual_seed(0)
    fitted = DefaultMoELayer(constant.config, _subs(constant), dm_config=dm)
    fitted.load_state_dict(constant.state_dict(), strict=False)
    fitted.set_layer_number(1)
    return plain, constant, fitted


def _subs(layer):
    from helpers import moe_submodules

    return moe_submodules(layer.config.num_moe_experts)


def test_line_tables_are_the_weighted_least_squares_line():
    torch.manual_seed(0)
    experts, hidden, n = 3, 5, 40
    s_EN = torch.randn(experts, n) * 2 + 1
    w_EN = torch.rand(experts, n) + 0.1
    a_EH, b_EH = torch.randn(experts, hidden), torch.randn(experts, hidden)
    y_ENH = a_EH[:, None] + s_EN[..., None] * b_EH[:, None] + 0.1 * torch.randn(experts, n, hidden)
    stats = torch.cat([(w_EN[..., None] * y_ENH).sum(1), (w_EN[..., None] * s_EN[..., None] * y_ENH).sum(1),
                       (w_EN * s_EN).sum(1, keepdim=True), (w_EN * s_EN**2).sum(1, keepdim=True),
                       w_EN.sum(1, keepdim=True)], dim=1)  # fmt: skip
    means = stats / stats[:, -1:]  # [y | s·y | s | s² | 1]: the moments of one update, weight 1
    a_fit, b_fit = FO.line_tables(means[:, :hidden], means)
    for i in range(experts):
        sw = w_EN[i].sqrt()[:, None]
        design = torch.stack([torch.ones(n), s_EN[i]], 1).double() * sw
        coef = torch.linalg.lstsq(design, y_ENH[i].double() * sw).solution
        torch.testing.assert_close(a_fit[i].double(), coef[0], rtol=3e-3, atol=3e-3)
        torch.testing.assert_close(b_fit[i].double(), coef[1], rtol=3e-3, atol=3e-3)
    a0, b0 = FO.line_tables(torch.zeros(2, hidden), torch.zeros(2, 2 * hidden + 3))  # no probes yet: B = 0, A = Ê
    assert not a0.any() and not b0.any()


def test_lines_are_debiased_while_the_window_fills():
    """The moments' EMAs start at zero: after ``n`` updates they carry weight ``1 − β_fit^n``, and the
    lines divide it out, so a long window's first updates already give the line of what they saw
    (without it the slope mixes moments scaled by ``c`` and ``c²``); an expert without probes keeps
    its line and weight."""
    torch.manual_seed(2)
    experts, hidden, beta_fit = 3, 4, 0.999
    vectors, fit = torch.zeros(experts, hidden), torch.zeros(experts, 2 * hidden + 3)
    q = FO.initial_direction_H(hidden, 0, 1, "cpu")
    d, skips = q.clone(), torch.zeros(experts, dtype=torch.long)
    batches = [torch.rand(experts + 1, 2 * hidden + 3) + 0.5 for _ in range(3)]
    for stats in batches:
        stats[1, -1] = 0.0  # expert 1 never has probes
    for n, stats in enumerate(batches, start=1):
        table, _, _ = FO.fit_update_reference(vectors, fit, q, d, stats, 0.0, beta_fit, skips, torch.float32)
        weights = [(1 - beta_fit) * beta_fit ** (n - k) for k in range(1, n + 1)]
        seen = sum(w * b[:experts] / b[:experts, -1:] for w, b in zip(weights, batches)) / sum(weights)
        a_EH, b_EH = FO.line_tables(stats[:experts, :hidden] / stats[:experts, -1:], seen)
        torch.testing.assert_close(fit[:, -1], torch.tensor([1 - beta_fit**n, 0.0, 1 - beta_fit**n]))
        keep = torch.tensor([0, 2])
        torch.testing.assert_close(table[experts:][keep], b_EH[keep], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(table[:experts][keep], a_EH[keep], rtol=1e-4, atol=1e-5)
        assert not table[experts + 1].any() and not table[1].any()  # no probes yet: B = 0, A = Ê = 0


def test_power_steps_find_the_leading_principal_direction():
    torch.manual_seed(1)
    hidden = 12
    basis, _ = torch.linalg.qr(torch.randn(hidden, hidden))
    scales = torch.linspace(3.0, 0.5, hidden)
    q_H = FO.initial_direction_H(hidden, 0, 1, "cpu")
    d_H = q_H.clone()
    for _ in range(40):
        x_TH = (torch.randn(256, hidden) * scales) @ basis.T + 5.0  # an offset: the covariance is centred
        FO.direction_step_(q_H, d_H, input_row(x_TH, d_H), 0.5)
    assert abs(float(d_H @ basis[:, 0])) > 0.99 and torch.allclose(d_H, FO.unit(q_H))
    before = q_H.clone()
    FO.direction_step_(q_H, d_H, torch.zeros(2 * hidden + 3), 0.5)  # no tokens: kept
    assert torch.equal(q_H, before)


def input_row(x_NH, d_H):
    """``[Σ x·s | Σ x | 0 | 0 | n]`` of the rows ``x`` (an independent sum)."""
    s_N1 = x_NH @ d_H[:, None]
    return torch.cat([(x_NH * s_N1).sum(0), x_NH.sum(0), torch.tensor([0.0, 0.0, len(x_NH)])])


@pytest.mark.parametrize("mode", ["forward", "backward-only"])
def test_term_and_its_gradient_follow_the_line(mode):
    torch.manual_seed(2)
    y, w = torch.randn(7, 4), torch.rand(7, 3)
    a, b, x, d = torch.randn(3, 4), torch.randn(3, 4), torch.randn(7, 5), torch.randn(5)
    s, g = x @ d[:, None], torch.randn(7, 4)
    w_ref = w.clone().requires_grad_()
    (y + w_ref @ a + s * (w_ref @ b)).backward(g)
    w_got = w.clone().requires_grad_()
    out = F.add_default_term(y, w_got, torch.cat([a, b]), mode, coordinates=F.Coordinates(x, d))
    out.backward(g)
    expected = y + F.default_term_TH(w, torch.cat([a, b]), F.Coordinates(x, d)) if mode == "forward" else y
    torch.testing.assert_close(out.detach(), expected)
    torch.testing.assert_close(w_got.grad, w_ref.grad)


def test_tables_follow_the_drawn_unchosen_pairs_and_the_term_uses_them(monkeypatch):
    """β = 0: the tables are this micro-batch's means over the drawn pairs (``E_i`` run token by
    token, ``s`` on the seeded start direction), the direction one power step from it on the probe
    tokens' covariance; the term gets ``line_tables`` of them and the tokens' coordinates on that
    start direction."""
    _, _, layer = fit_twins(beta=0.0, fit_beta=0.0)
    seen = {}
    add = F.add_default_term
    monkeypatch.setattr(F, "add_default_term", lambda *a, **k: seen.update(k, table=a[2]) or add(*a, **k))
    torch.manual_seed(5)
    x = torch.randn(6, 2, 16)
    d0 = layer.fit.initial_direction
    step(layer, x, torch.randn(6, 2, 16))
    x_TH = x.reshape(-1, 16)
    tokens_B, experts_B, probs_B, _ = layer.probes.last_probes
    with torch.no_grad():
        y_B = expert_outputs_TEH(layer, x_TH)[tokens_B, experts_B]
    s_B, w_B = x_TH[tokens_B] @ d0, -probs_B
    count_E = torch.zeros(8).index_add_(0, experts_B, w_B).clamp_min(1e-30)[:, None]
    mean_y = torch.zeros(8, 16).index_add_(0, experts_B, w_B[:, None] * y_B) / count_E
    mean_sy = torch.zeros(8, 16).index_add_(0, experts_B, (w_B * s_B)[:, None] * y_B) / count_E
    mean_s = torch.zeros(8, 1).index_add_(0, experts_B, (w_B * s_B)[:, None]) / count_E
    mean_s2 = torch.zeros(8, 1).index_add_(0, experts_B, (w_B * s_B**2)[:, None]) / count_E
    torch.testing.assert_close(layer.default_vectors, mean_y, rtol=1e-5, atol=1e-6)
    probed_E1 = (torch.zeros(8).index_add_(0, experts_B, w_B) > 0).float()[:, None]  # the moments' weight
    torch.testing.assert_close(layer.default_fit, torch.cat([mean_y, mean_sy, mean_s, mean_s2, probed_E1], 1),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    xp = x_TH[tokens_B[probs_B < 0]]  # the probe tokens: a uniform sample of the micro-batch
    xc = xp - xp.mean(0)
    torch.testing.assert_close(layer.default_direction, xc.T @ (xc @ d0) / len(xp), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.default_direction_unit, FO.unit(layer.default_direction))
    a_EH, b_EH = FO.line_tables(layer.default_vectors, layer.default_fit)
    torch.testing.assert_close(seen["table"], torch.cat([a_EH, b_EH]))
    torch.testing.assert_close(seen["coordinates"].formed().s_T1, (x_TH @ d0)[:, None])
    assert b_EH.abs().sum() > 0


def test_fit_changes_only_the_router_gradient():
    """Backward-only router: output and expert gradients are the constant layer's (the same
    probes); the router's gradient differs (the term's line), and so the input's through it."""
    plain, constant, fitted = fit_twins()
    torch.manual_seed(3)
    for _ in range(3):
        x, g = torch.randn(6, 2, 16), torch.randn(6, 2, 16)
        out0, dx0, grads0, losses0 = step(constant, x, g)
        out1, dx1, grads1, losses1 = step(fitted, x, g)
        assert torch.equal(out1, out0)
        for name in grads0:
            if "router" not in name:
                assert fp32_close(grads1[name], grads0[name]), name
        assert torch.equal(fitted.default_vectors, constant.default_vectors)
    assert not torch.allclose(grads1["router.weight"], grads0["router.weight"])


@pytest.mark.parametrize("update", ["microbatch", "step"])
def test_recompute_and_step_mode_with_the_fit(update):
    """Megatron's MoE recompute: the tables move once (bit for bit as without recompute), and the
    recompute pass's term uses the first pass's direction."""
    from megatron_default_moe import update_default_vectors

    _, _, fitted = fit_twins(update=update)
    _, _, recomputed = fit_twins(update=update, recompute_granularity="selective", recompute_modules=["moe"])
    recomputed.load_state_dict(fitted.state_dict())
    torch.manual_seed(11)
    for _ in range(3):
        x, g = torch.randn(6, 2, 16), torch.randn(6, 2, 16)
        (out_f, dx_f, grads_f, _), (out_r, dx_r, grads_r, _) = step(fitted, x, g), step(recomputed, x, g)
        if update == "step":
            for layer in (fitted, recomputed):  # one bucket each: the same memory layout, the same bits
                update_default_vectors(layer)
        assert fp32_close(out_r, out_f) and fp32_close(dx_r, dx_f)
        for name in grads_f:
            assert fp32_close(grads_r[name], grads_f[name]), name
        for name in S.TABLES + ("default_direction", "default_direction_unit"):
            assert torch.equal(getattr(fitted, name), getattr(recomputed, name)), name
    assert fitted.default_fit.any()


def test_checkpoint_carries_the_fit_and_a_constant_checkpoint_starts_it_afresh(caplog):
    _, constant, fitted = fit_twins()
    torch.manual_seed(4)
    step(fitted, torch.randn(6, 2, 16), torch.randn(6, 2, 16))
    state = fitted.state_dict()
    assert {"default_fit", "default_direction", "default_vectors"} <= set(state)
    _, _, again = fit_twins()
    again.load_state_dict(state)
    for name in ("default_vectors", "default_fit", "default_direction"):
        assert torch.equal(getattr(again, name), state[name]), name
    assert "default_direction_unit" not in state
    torch.testing.assert_close(again.default_direction_unit, FO.unit(again.default_direction))
    with caplog.at_level(logging.WARNING):
        again.load_state_dict(constant.state_dict())  # strict: the fit's keys are filled, not missing
    assert not again.default_fit.any() and torch.equal(again.default_direction, again.fit.initial_direction)
    torch.testing.assert_close(again.default_direction_unit, again.fit.initial_direction)
    assert "default-vector fit" in caplog.text
    old = dict(state, default_fit=state["default_fit"][:, :-1])  # saved before the moments' weight
    again.load_state_dict(old)
    assert torch.equal(again.default_fit, torch.cat([old["default_fit"], torch.ones(8, 1)], 1))


def test_fit_window_holds_about_16h_probes_per_expert_unless_given():
    """12 probes per micro-batch on one rank over 8 experts, H = 16: 1 - 1.5 / 256; never below β."""
    assert fit_twins()[2].fit.beta == pytest.approx(1 - 1.5 / 256)
    assert fit_twins(beta=0.999)[2].fit.beta == pytest.approx(0.999)
    assert fit_twins(fit_beta=0.5)[2].fit.beta == 0.5
    with pytest.raises(ValueError, match="--moe-default-fit-beta must lie in"):
        DefaultMoEConfig(fit="shared-1", probes=4, fit_beta=1.5)


def test_fit_rejects_what_it_cannot_run():
    with pytest.raises(ValueError, match="--moe-default-fit shared-1.*--moe-default-probes"):
        DefaultMoEConfig(fit="shared-1", probes=0)
    with pytest.raises(ValueError, match="--moe-default-fit must be one of"):
        DefaultMoEConfig(fit="top1", probes=4)
    from helpers import moe_config, moe_submodules
    from test_probes import ROUTERS

    config = moe_config(**ROUTERS["mixtral"], moe_expert_capacity_factor=1.5)
    with pytest.raises(ValueError, match="--moe-default-fit shared-1 needs probes.*auto"):
        DefaultMoELayer(config, moe_submodules(8), dm_config=DefaultMoEConfig(probes="auto", fit="shared-1"))


def test_the_next_pass_reads_the_direction_the_update_wrote(monkeypatch):
    """``fit_update`` writes the new ``d`` as its table's last row (the term gets ``[A; B]`` only);
    the next pass's coordinates take that row, the cast of the buffer bit for bit, and a buffer
    changed since (a load, a user's write) is cast afresh."""
    _, _, layer = fit_twins()
    seen = {}
    add = F.add_default_term
    torch.manual_seed(7)
    x = torch.randn(6, 2, 16)
    step(layer, x, torch.randn(6, 2, 16))
    d_H = layer.default_direction_unit
    cached = layer.fit.direction_as(layer, x.dtype)
    assert torch.equal(cached, d_H.to(x.dtype)) and cached.data_ptr() != d_H.data_ptr()  # the table's row
    assert torch.equal(layer.fit.direction_as(layer, torch.bfloat16), d_H.to(torch.bfloat16))  # another dtype
    with torch.no_grad():
        d_H.copy_(FO.unit(torch.randn(16)))
    assert torch.equal(layer.fit.direction_as(layer, x.dtype), d_H)
    d_set = d_H.clone()  # the update of the next step moves the buffer
    monkeypatch.setattr(F, "add_default_term", lambda *a, **k: seen.update(k, table=a[2]) or add(*a, **k))
    step(layer, x, torch.randn(6, 2, 16))
    assert seen["table"].shape == (2 * 8, 16)
    torch.testing.assert_close(seen["coordinates"].formed().s_T1, x.reshape(-1, 16) @ d_set[:, None])
