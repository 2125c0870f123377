"""Router-gradient diagnostics (paper Fig. 4): pure helpers, the three routings against an
independent reference computed from the layer's own experts, and the paper's qualitative claim."""

import math

import pytest
import torch
from helpers import build_layers, moe_config

from megatron_default_moe import DefaultMoEConfig
from megatron_default_moe.analysis.diagnostics import (
    cosine,
    plot_router_gradient_cosines,
    router_gradient_cosines,
    router_gradients,
)
from megatron_default_moe.analysis.vector_quality import default_vector_stats


# -- pure helpers -----------------------------------------------------------------------------------
def test_cosine():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert cosine(a, 3 * a) == pytest.approx(1.0)
    assert cosine(a, -a) == pytest.approx(-1.0)
    assert cosine(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])) == pytest.approx(0.0)
    assert cosine(torch.zeros(3), torch.ones(3)) == 0.0


def test_default_vector_stats():
    d = torch.tensor([[3.0, 4.0], [0.0, 2.0], [0.0, 0.0]])
    s = default_vector_stats(d)
    assert (s["experts"], s["nonzero"]) == (3, 2)
    assert s["max_norm"] == pytest.approx(5.0) and s["min_norm"] == 0.0
    assert s["mean_norm"] == pytest.approx(7.0 / 3)
    assert s["mean_pairwise_cosine"] == pytest.approx(0.8)  # (3,4)·(0,1)/5
    assert math.isnan(default_vector_stats(torch.zeros(4, 2))["mean_pairwise_cosine"])


# -- Megatron layers --------------------------------------------------------------------------------
def _hand_output(layer, x_TH, W, variant):
    """``y`` of one layer rebuilt by hand from its experts (no Megatron routing): ``topk``
    (``π`` on the top-k of the full softmax), ``default`` (plus ``π`` on the others times ``Ê``)
    or ``dense`` (``π`` on every expert)."""
    pi_TE = torch.softmax(x_TH @ W.T, dim=-1)
    k = layer.config.moe_router_topk
    selected_TE = torch.zeros_like(pi_TE, dtype=torch.bool).scatter(1, pi_TE.topk(k, dim=-1).indices, True)
    with torch.no_grad():
        ones_T = torch.ones(x_TH.shape[0])
        o_TEH = torch.stack([expert(x_TH, ones_T)[0] for expert in layer.experts.local_experts], dim=1)
    if variant == "dense":
        return (pi_TE.unsqueeze(-1) * o_TEH).sum(1)
    y_TH = (pi_TE * selected_TE).unsqueeze(-1).mul(o_TEH).sum(1)
    if variant == "default":
        y_TH = y_TH + (pi_TE * ~selected_TE) @ layer.default_vectors
    return y_TH


def _reference_router_grad(layer, x_SBH, g_SBH, variant):
    """``d/dW`` of ``Σ g·y`` with ``y`` from ``_hand_output``."""
    x_TH = x_SBH.reshape(-1, x_SBH.shape[-1])
    W = layer.router.weight.detach().clone().requires_grad_(True)
    y_TH = _hand_output(layer, x_TH, W, variant)
    (grad,) = torch.autograd.grad((y_TH * g_SBH.reshape(y_TH.shape)).sum(), [W])
    return grad


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.reshape(-1).double(), b.reshape(-1).double(), dim=0))


def _loss_fn(x, g):
    return lambda layer: (layer(x)[0] * g).sum()


@pytest.mark.parametrize("variant", ["topk", "default", "dense"])
def test_variants_match_hand_built_reference(megatron_cpu, variant):
    config = moe_config(num_moe_experts=4, moe_router_topk=2)
    _, layer = build_layers(config, DefaultMoEConfig(beta=0.5), seed=1)
    torch.manual_seed(2)
    layer.default_vectors.copy_(torch.randn_like(layer.default_vectors))
    x, g = torch.randn(6, 2, 16), torch.randn(6, 2, 16)
    before = layer.default_vectors.clone()

    routing = {"topk": dict(topk=[layer]), "default": {}, "dense": dict(dense=[layer])}[variant]
    got = router_gradients(layer, _loss_fn(x, g), **routing)
    want = _reference_router_grad(layer, x, g, variant)
    assert list(got) == [0]  # a bare layer has no layer number: keyed by position
    torch.testing.assert_close(got[0], want, rtol=1e-4, atol=1e-5)
    # Nothing was changed: routing restored, vectors untouched (no EMA, no zeroing left behind),
    # no .grad written, training flag restored.
    assert (config.moe_router_topk, layer.router.topk, getattr(layer.token_dispatcher, "router_topk", 2)) == (2, 2, 2)
    assert torch.equal(layer.default_vectors, before)
    assert all(p.grad is None for p in layer.parameters())
    assert layer.training


def test_k_equals_n_all_three_coincide(megatron_cpu):
    config = moe_config(num_moe_experts=4, moe_router_topk=4)
    _, layer = build_layers(config, DefaultMoEConfig(beta=0.5), seed=3)
    torch.manual_seed(4)
    for _ in range(3):  # EMA updates: the vectors are non-zero but never used with K = N
        layer(torch.randn(6, 2, 16))
    assert layer.default_vectors.abs().sum() > 0
    x, g = torch.randn(6, 2, 16), torch.randn(6, 2, 16)
    grads = {
        "topk": router_gradients(layer, _loss_fn(x, g), topk=[layer])[0],
        "default": router_gradients(layer, _loss_fn(x, g))[0],
        "dense": router_gradients(layer, _loss_fn(x, g), dense=[layer])[0],
    }
    torch.testing.assert_close(grads["topk"], grads["dense"])
    torch.testing.assert_close(grads["default"], grads["dense"])
    cos = router_gradient_cosines(layer, _loss_fn(x, g))[0]
    assert cos["topk"] == pytest.approx(1.0) and cos["default"] == pytest.approx(1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_moe_is_closer_to_dense_than_topk(megatron_cpu, seed):
    """The paper's claim on a toy layer: after a few EMA updates the Default MoE router gradient
    points much closer to the dense one than the TopK gradient does.

    Tokens share a large common component (as real hidden states do) that the router does not
    see (orthogonal to its weight rows), so routing still spreads tokens over all experts while
    each expert's outputs cluster around the mean the EMA tracks. Deterministic (fixed seeds); the
    margins seen are 0.3 to 0.8, so the bounds below are not a coin flip.
    """
    config = moe_config(num_moe_experts=8, moe_router_topk=1)
    _, layer = build_layers(config, DefaultMoEConfig(beta=0.5), seed=seed)
    gen = torch.Generator().manual_seed(100 + seed)
    basis_HE, _ = torch.linalg.qr(layer.router.weight.detach().T)  # the router's row space
    v_H = torch.randn(16, generator=gen)
    mean_H = v_H - basis_HE @ (basis_HE.T @ v_H)
    mean_H = 3.0 * mean_H / mean_H.norm()

    def tokens():
        return mean_H + 0.3 * torch.randn(16, 4, 16, generator=gen)

    for _ in range(8):
        layer(tokens())  # training forwards: EMA updates, before use
    assert (layer.default_vectors.norm(dim=-1) > 0).all()
    cos = router_gradient_cosines(layer, _loss_fn(tokens(), torch.randn(16, 4, 16, generator=gen)))[0]
    assert cos["default"] > cos["topk"] + 0.15, cos
    assert cos["default"] > 0.7, cos


class _TwoLayers(torch.nn.Module):
    """Two Default MoE layers on a residual stream, sharing one config (as in a GPT block)."""

    def __init__(self, config, dm_config):
        super().__init__()
        self.first = build_layers(config, dm_config, seed=7)[1]
        self.second = build_layers(config, dm_config, seed=8)[1]

    def forward(self, x):
        h = x + self.first(x)[0]
        return h + self.second(h)[0], None


def test_layers_are_measured_in_isolation(megatron_cpu):
    config = moe_config(num_moe_experts=4, moe_router_topk=1)
    model = _TwoLayers(config, DefaultMoEConfig(beta=0.5))
    torch.manual_seed(9)
    for _ in range(3):
        model(torch.randn(6, 2, 16))
    x, g = torch.randn(6, 2, 16), torch.randn(6, 2, 16)

    # The second layer dense, the first as built: the reference sees the first layer's real output.
    got = router_gradients(model, _loss_fn(x, g), dense=[model.second])
    model.eval()
    with torch.no_grad():
        h = x + model.first(x)[0]
    model.train()
    torch.testing.assert_close(got[1], _reference_router_grad(model.second, h, g, "dense"), rtol=1e-4, atol=1e-5)
    assert config.moe_router_topk == 1 and model.second.token_dispatcher.config is config

    # The second layer's cosines against the hand-built reference: isolated, the first layer runs
    # as built (input h); not isolated, every layer runs in the variant, so the second one sees the
    # first's TopK (x + y_topk) or dense (x + y_dense) output.
    W1 = model.first.router.weight.detach()
    with torch.no_grad():
        h_by = {v: x + _hand_output(model.first, x.reshape(-1, 16), W1, v).reshape(x.shape) for v in ("topk", "dense")}

    def ref(h, variant):
        return _reference_router_grad(model.second, h, g, variant)

    want = {
        True: {"topk": _cos(ref(h, "topk"), ref(h, "dense")), "default": _cos(ref(h, "default"), ref(h, "dense"))},
        False: {"topk": _cos(ref(h_by["topk"], "topk"), ref(h_by["dense"], "dense")),
                "default": _cos(ref(h, "default"), ref(h_by["dense"], "dense"))},
    }  # fmt: skip
    for isolate in (True, False):
        cos = router_gradient_cosines(model, _loss_fn(x, g), isolate_layers=isolate)
        assert sorted(cos) == [0, 1]
        assert cos[1]["topk"] == pytest.approx(want[isolate]["topk"], abs=1e-5)
        assert cos[1]["default"] == pytest.approx(want[isolate]["default"], abs=1e-5)
    # the two modes differ here by more than the tolerance above, so each assert tells them apart
    assert max(abs(want[True][k] - want[False][k]) for k in ("topk", "default")) > 1e-4


def test_stock_layer_reports_no_default(megatron_cpu):
    config = moe_config(num_moe_experts=4, moe_router_topk=1)
    stock, _ = build_layers(config, seed=5)
    x, g = torch.randn(4, 2, 16), torch.randn(4, 2, 16)
    cos = router_gradient_cosines(stock, _loss_fn(x, g))
    want = _cos(_reference_router_grad(stock, x, g, "topk"), _reference_router_grad(stock, x, g, "dense"))
    assert cos[0]["default"] is None and cos[0]["extra_ratio"] is None
    assert cos[0]["topk"] == pytest.approx(want, abs=1e-5) and abs(want) < 0.999


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    history = {
        "TopK": {0: {2: {"topk": 0.3, "default": None}}, 10: {2: {"topk": 0.4, "default": None}}},
        "Default MoE": {0: {2: {"topk": 0.3, "default": 0.3}}, 10: {2: {"topk": 0.35, "default": 0.8}}},
    }
    path = tmp_path / "cos.png"
    plot_router_gradient_cosines(history, str(path))
    assert path.stat().st_size > 1000


# -- default-vector bias ------------------------------------------------------------------------------
def test_default_vector_bias_matches_hand_computation(megatron_cpu):
    from megatron_default_moe.analysis.vector_quality import default_vector_bias, expert_output_moments

    config = moe_config(num_moe_experts=4, moe_router_topk=1)
    _, layer = build_layers(config, DefaultMoEConfig(beta=0.5), seed=11)
    torch.manual_seed(12)
    layer.default_vectors.copy_(torch.randn_like(layer.default_vectors))
    x = torch.randn(16, 2, 16)
    got = default_vector_bias(layer, lambda m: m(x))[0]
    moments = expert_output_moments(layer, lambda m: m(x))[0]

    # By hand: TopK selection from the router's softmax, every expert on every token.
    x_TH = x.reshape(-1, 16)
    with torch.no_grad():
        chosen_T = torch.softmax(x_TH @ layer.router.weight.T, dim=-1).argmax(-1)
        o_ETH = torch.stack([e(x_TH, torch.ones(32))[0] for e in layer.experts.local_experts]).double()
    d_EH = layer.default_vectors.double()
    bias, gap, cos = [], [], []
    for e in range(4):
        un, ch = o_ETH[e][chosen_T != e], o_ETH[e][chosen_T == e]
        torch.testing.assert_close(moments["unchosen_mean"][e], un.mean(0))
        assert int(moments["unchosen_count"][e]) == len(un) and int(moments["chosen_count"][e]) == len(ch)
        if len(ch) == 0:
            continue
        spread = (un - un.mean(0)).pow(2).sum(-1).mean().sqrt()
        bias.append(float((d_EH[e] - un.mean(0)).norm() / spread))
        gap.append(float((ch.mean(0) - un.mean(0)).norm() / spread))
        cos.append(float(torch.nn.functional.cosine_similarity(d_EH[e], un.mean(0), dim=0)))
    assert got["experts"] == len(bias) >= 2
    assert got["bias"] == pytest.approx(sum(bias) / len(bias), rel=1e-6)
    assert got["selection_gap"] == pytest.approx(sum(gap) / len(gap), rel=1e-6)
    assert got["cosine"] == pytest.approx(sum(cos) / len(cos), rel=1e-6)
    assert layer.training and all(p.grad is None for p in layer.parameters())

    # Ê set to the unchosen mean: no bias left.
    layer.default_vectors.copy_(moments["unchosen_mean"].float())
    assert default_vector_bias(layer, lambda m: m(x))[0]["bias"] < 1e-5
