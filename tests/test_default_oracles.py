"""Richer-default oracles (``analysis/default_oracles.py``) on one rank, on a real ``MoELayer``.

The plumbing is proven by its limits: with ``V_{t,i} = E_i(x_t)`` (``exact``) the Default MoE
router gradient *is* the dense one, for the paper router (forward mode) and the renormalised /
sigmoid ones (backward-only); with ``V = u_i`` (``constant``) it equals the layer's own gradient
with its vectors set to ``u``. The fits are checked against closed forms on data they can
represent exactly, and the shrink ceiling against a brute-force search.
"""

import pytest
import torch
from helpers import moe_config, moe_submodules
from test_routers import FAMILIES

from megatron_default_moe import DefaultMoEConfig, DefaultMoELayer
from megatron_default_moe.analysis import default_oracles as O
from megatron_default_moe.analysis import oracle_fits as OF
from megatron_default_moe.analysis.diagnostics import cosine, router_gradient_triples

pytestmark = pytest.mark.usefixtures("megatron_cpu")

ROUTERS = {"paper": dict(num_moe_experts=8, moe_router_topk=1), **FAMILIES}


def _layer(router, **dm):
    config = moe_config(**ROUTERS[router])
    torch.manual_seed(0)
    dm_config = DefaultMoEConfig(**{"beta": 0.5, "probes": 0, **dm})  # constant vectors, set below
    layer = DefaultMoELayer(config, moe_submodules(config.num_moe_experts), dm_config=dm_config)
    layer.set_layer_number(1)
    gen = torch.Generator().manual_seed(3)
    layer.default_vectors.copy_(torch.randn(layer.default_vectors.shape, generator=gen))
    return layer, torch.randn(8, 2, 16, generator=gen), torch.randn(8, 2, 16, generator=gen)


@pytest.mark.parametrize("router", ["paper", "mixtral", "deepseek_v3", "sqrtsoftplus"])
def test_exact_vectors_give_the_dense_gradient(router):
    layer, x, g = _layer(router)
    grams = O.richer_default_ceilings(layer, lambda m: (m(x)[0] * g).sum(), lambda m: m(x), lambda m: m(x),
                                      candidates=("exact", "constant"))  # fmt: skip
    exact = grams["exact"][1]
    assert exact["dg"] / (exact["dd"] * exact["gg"]) ** 0.5 == pytest.approx(1.0, abs=1e-6)
    constant = grams["constant"][1]
    assert constant["dg"] / (constant["dd"] * constant["gg"]) ** 0.5 < 0.999  # not trivially dense
    # the layer's own vectors restored, and constant = the layer with Ê = u (in-batch fit)
    (x_NH, routed_NE, top1_N, _), = O.record_routing(layer, lambda m: m(x)).values()
    u_EH = OF.fit_candidates(x_NH, routed_NE, top1_N, O.expert_outputs_ENH(layer, x_NH))["u_EH"]
    saved = layer.default_vectors.clone()
    layer.default_vectors.copy_(u_EH.float())
    t, d, dense = router_gradient_triples(layer, lambda m: (m(x)[0] * g).sum())[1]
    layer.default_vectors.copy_(saved)
    assert constant["dg"] / (constant["dd"] * constant["gg"]) ** 0.5 == pytest.approx(cosine(d, dense), abs=1e-5)
    assert constant["tg"] / (constant["tt"] * constant["gg"]) ** 0.5 == pytest.approx(cosine(t, dense), abs=1e-6)


def test_exact_vectors_stand_in_for_a_fitted_line_too():
    """A sigmoid router's default layer (probes and the ``shared-1`` fit): the candidates replace
    its whole default term, the line included."""
    layer, x, g = _layer("deepseek_v3", probes=None)
    assert layer.fit is not None
    layer(x)  # a training pass: the fit's tables move off zero
    exact = O.richer_default_ceilings(layer, lambda m: (m(x)[0] * g).sum(), lambda m: m(x), lambda m: m(x),
                                      candidates=("exact",))["exact"][1]  # fmt: skip
    assert exact["dg"] / (exact["dd"] * exact["gg"]) ** 0.5 == pytest.approx(1.0, abs=1e-6)


def test_fits_recover_what_they_can_represent():
    gen = torch.Generator().manual_seed(0)
    n, h, e = 400, 6, 3
    x = torch.randn(n, h, generator=gen, dtype=torch.float64)
    top1 = torch.randint(0, e, (n,), generator=gen)
    routed = torch.zeros(n, e, dtype=torch.bool)
    routed[torch.arange(n), top1] = True
    b_EHH = torch.randn(e, h, h, generator=gen, dtype=torch.float64)
    u, s, vt = torch.linalg.svd(b_EHH)
    b_EHH = u[:, :, :2] @ torch.diag_embed(s[:, :2]) @ vt[:, :2]  # rank 2
    c_EH = torch.randn(e, h, generator=gen, dtype=torch.float64)
    o_ENH = c_EH[:, None] + torch.einsum("nh,ehk->enk", x, b_EHH)
    fit = OF.fit_candidates(x, routed, top1, o_ENH, ranks=(2, 1), shared_ranks=(6,), ridge=0.0)
    unchosen = ~routed.T
    for i in range(e):
        torch.testing.assert_close(fit["u_EH"][i], o_ENH[i][unchosen[i]].mean(0))
        for j in range(e):
            rows = unchosen[i] & (top1 == j)
            want = o_ENH[i][rows].mean(0) if rows.any() else fit["u_EH"][i]
            torch.testing.assert_close(fit["top1_EEH"][i, j], want)
    v = OF.candidate_vectors_TEH("linear-2", fit, x, top1)
    torch.testing.assert_close(v, o_ENH.transpose(0, 1))  # a rank-2 affine map: recovered exactly
    v1 = OF.candidate_vectors_TEH("linear-1", fit, x, top1)
    assert (v1 - o_ENH.transpose(0, 1)).norm() > 1e-3  # rank 1 cannot
    torch.testing.assert_close(OF.candidate_vectors_TEH("shared-6", fit, x, top1), o_ENH.transpose(0, 1))  # full basis
    v = OF.candidate_vectors_TEH("top1", fit, x, top1)
    torch.testing.assert_close(v[5, 2], fit["top1_EEH"][2, top1[5]])


def test_shrink_ceiling_matches_brute_force():
    gen = torch.Generator().manual_seed(1)
    t, d, g = (torch.randn(50, generator=gen, dtype=torch.float64) for _ in range(3))
    d = 0.5 * d + 0.5 * g
    gram = OF.gram_of(t, d, g)
    for alpha in (0.0, 0.3, 1.0):
        assert OF.shrunk_cosine(gram, alpha) == pytest.approx(cosine(t + alpha * (d - t), g))
    alpha, best = OF.shrink_ceiling(gram, steps=200)
    brute = max(cosine(t + a / 200 * (d - t), g) for a in range(201))
    assert best == pytest.approx(brute) and 0 < alpha <= 1
    assert best >= max(cosine(t, g), cosine(d, g))
