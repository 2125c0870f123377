"""Default MoE on every Megatron router family (``DESIGN.md`` §1.6, ``ROUTERS.md`` §4), on a real
``MoELayer``: an independent token-by-token reference per family, ``K = N`` and backward-only
bit-identity with the stock layer, capacity dropping, padding, aux losses, shared experts, biases.

The reference below is written from the layer's weights and the routing formulas, not from
Megatron's code: scores ``f``, selection (with expert bias and group limits), probs
``p = c·f/N`` on the selected set, and the default weights ``w = c·f/sg(N)`` elsewhere. Tests
whose reference takes the routed rows' EMA set ``probes=0`` (the sigmoid router's default draws
probes: ``test_probes.py``, ``test_shared_fit.py``).
"""

import pytest
import torch
import torch.nn.functional as TF
from helpers import moe_config, moe_submodules

from megatron_default_moe import DefaultMoEConfig, DefaultMoELayer

pytestmark = pytest.mark.usefixtures("megatron_cpu")

# name -> TransformerConfig overrides (tiny versions of the real models' routing, ROUTERS.md §2)
FAMILIES = {
    "mixtral": dict(  # softmax after top-k: renormalised
        num_moe_experts=8, moe_router_topk=2, moe_router_pre_softmax=False
    ),
    "deepseek_v3": dict(  # sigmoid, expert bias, groups, scaling factor, one shared expert
        num_moe_experts=16,
        moe_router_topk=4,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=1e-3,
        moe_router_num_groups=4,
        moe_router_group_topk=2,
        moe_router_topk_scaling_factor=2.5,
        moe_shared_expert_intermediate_size=8,
    ),
    "deepseek_v2": dict(  # softmax with pre-softmax, scaling factor 2
        num_moe_experts=8, moe_router_topk=2, moe_router_pre_softmax=True, moe_router_topk_scaling_factor=2.0
    ),
    "sqrtsoftplus": dict(num_moe_experts=8, moe_router_topk=2, moe_router_score_function="sqrtsoftplus"),
    "sigmoid_top1": dict(num_moe_experts=8, moe_router_topk=1, moe_router_score_function="sigmoid"),
    "gpt_oss": dict(  # renormalised softmax with router and expert biases
        num_moe_experts=8, moe_router_topk=2, moe_router_pre_softmax=False, add_bias_linear=True
    ),
}


def family_config(name, **overrides):
    return moe_config(**{**FAMILIES[name], **overrides})


@pytest.fixture(autouse=True)
def _sequential_mlp_bias_at_tp1(monkeypatch):
    """Megatron 0.19's ``SequentialMLP`` with ``--add-bias-linear`` at EP = TP = 1 adds the fc2 bias
    in place into the output of ``_ReduceFromModelParallelRegion``, which at group size 1 returns
    its input (a view): autograd refuses, in the stock layer too. Clone there, for both layers."""
    from megatron.core.tensor_parallel import layers

    reduce = layers.reduce_from_tensor_model_parallel_region

    def reduce_then_clone(input_, group=None):
        return reduce(input_, group=group).clone()

    monkeypatch.setattr(layers, "reduce_from_tensor_model_parallel_region", reduce_then_clone)


def build(config, dm_config=None, seed=0):
    """A stock ``MoELayer`` and a ``DefaultMoELayer`` with identical weights (random expert bias)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    subs = moe_submodules(config.num_moe_experts)
    torch.manual_seed(seed)
    stock = MoELayer(config, subs)
    layer = DefaultMoELayer(config, subs, dm_config=dm_config)
    layer.load_state_dict(stock.state_dict(), strict=False)
    with torch.no_grad():
        stock.router.weight.mul_(30)  # Megatron's init gives near-uniform scores: spread them
        for p in [*stock.parameters()]:
            if p.dim() == 1:  # biases start at zero in Megatron: make them matter
                p.normal_(0, 0.3)
        layer.load_state_dict(stock.state_dict(), strict=False)
        if stock.router.expert_bias is not None:
            bias = torch.randn(config.num_moe_experts, generator=torch.Generator().manual_seed(seed)) * 0.05
            stock.router.expert_bias.copy_(bias)
            layer.router.expert_bias.copy_(bias)
    return stock, layer


def inputs(seed, seq=6, batch=2, hidden=16):
    gen = torch.Generator().manual_seed(100 + seed)
    return torch.randn(seq, batch, hidden, generator=gen), torch.randn(seq, batch, hidden, generator=gen)


def run(layer, x, g, padding_mask=None):
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out, _ = layer(x, padding_mask=padding_mask) if padding_mask is not None else layer(x)
    (out * g).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return out.detach(), grads, x.grad


# -- the independent reference ----------------------------------------------------------------
def ref_routing(layer, x_TH):
    """Scores ``f``, selected sets, probs ``p`` ``[T, E]`` and normaliser ``N`` ``[T, 1]``."""
    cfg, router = layer.config, layer.router
    E, K = cfg.num_moe_experts, cfg.moe_router_topk
    z = x_TH @ router.weight.T + (router.bias if getattr(router, "bias", None) is not None else 0)
    fn = cfg.moe_router_score_function
    f = {"softmax": lambda: torch.softmax(z, -1), "sigmoid": lambda: torch.sigmoid(z)}.get(
        fn, lambda: TF.softplus(z).sqrt()
    )()
    if fn == "softmax":
        sel = f if cfg.moe_router_pre_softmax else z
    else:
        sel = f + (router.expert_bias if router.expert_bias is not None else 0)
    sel = sel.detach()
    chosen = []
    for t in range(len(x_TH)):
        allowed = list(range(E))
        if cfg.moe_router_num_groups:
            G, g = cfg.moe_router_num_groups, cfg.moe_router_group_topk
            size = E // G
            group_score = [sorted(sel[t, j * size : (j + 1) * size].tolist())[-(K // g) :] for j in range(G)]
            best = sorted(range(G), key=lambda j: -sum(group_score[j]))[:g]
            allowed = [i for j in best for i in range(j * size, (j + 1) * size)]
        chosen.append(sorted(allowed, key=lambda i: -float(sel[t, i]))[:K])
    mask = torch.zeros(len(x_TH), E, dtype=torch.bool)
    for t, a in enumerate(chosen):
        mask[t, a] = True
    renorm = (fn == "softmax" and not cfg.moe_router_pre_softmax) or (fn != "softmax" and K > 1)
    N = (f * mask).sum(-1, keepdim=True) + (1e-20 if fn != "softmax" else 0) if renorm else torch.ones(len(x_TH), 1)
    c = cfg.moe_router_topk_scaling_factor or 1.0
    return f, mask, c * f / N * mask, c, N


def ref_expert(layer, i, v_H):
    mlp = layer.experts.local_experts[i]
    b1 = mlp.linear_fc1.bias if mlp.linear_fc1.bias is not None else 0
    b2 = mlp.linear_fc2.bias if mlp.linear_fc2.bias is not None else 0
    return TF.gelu(v_H @ mlp.linear_fc1.weight.T + b1) @ mlp.linear_fc2.weight.T + b2


def ref_shared(layer, x_TH):
    if layer.shared_experts is None:
        return 0
    s = layer.shared_experts
    out = TF.gelu(x_TH @ s.linear_fc1.weight.T) @ s.linear_fc2.weight.T
    if getattr(s, "gate_weight", None) is not None:
        out = out * torch.sigmoid(x_TH @ s.gate_weight.T)
    return out


def reference(layer, x_SBH, defaults_EH, beta, mode, weighting="uniform"):
    """Output and updated default vectors of one training forward (update before use)."""
    cfg = layer.config
    x_TH = x_SBH.reshape(-1, cfg.hidden_size)
    f, mask, p, c, N = ref_routing(layer, x_TH)
    outs = {(t, i): ref_expert(layer, i, x_TH[t]) for t, i in mask.nonzero().tolist()}
    new_EH = defaults_EH.clone()
    for i in range(cfg.num_moe_experts):
        rows = [(t, o) for (t, e), o in outs.items() if e == i]
        if rows:
            w = [1.0 if weighting == "uniform" else float(p[t, i]) for t, _ in rows]
            new_EH[i] = beta * defaults_EH[i] + (1 - beta) * sum(a * o.detach() for a, (_, o) in zip(w, rows)) / sum(w)
    stock = torch.stack(
        [sum(p[t, i] * outs[t, i] for i in range(cfg.num_moe_experts) if mask[t, i]) for t in range(len(x_TH))]
    )
    stock = stock + ref_shared(layer, x_TH)
    w = c * f / N.detach() * ~mask
    d = w @ new_EH
    y = stock + d if mode == "forward" else stock + (d - d.detach())
    return y.view_as(x_SBH), new_EH


def check_against_reference(layer, steps=3, beta=0.7, mode=None, weighting="uniform"):
    mode = mode or layer.mode
    defaults = torch.zeros_like(layer.default_vectors)
    for step in range(steps):
        x, g = inputs(step, hidden=layer.config.hidden_size)
        out, grads, x_grad = run(layer, x, g)
        params = dict(layer.named_parameters())
        x_ref = x.clone().requires_grad_()
        y_ref, defaults = reference(layer, x_ref, defaults, beta, mode, weighting)
        ref_grads = torch.autograd.grad((y_ref * g).sum(), [x_ref, *params.values()], allow_unused=True)
        torch.testing.assert_close(layer.default_vectors, defaults, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out, y_ref.detach(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(x_grad, ref_grads[0], atol=1e-5, rtol=1e-4)
        for (name, _), ref in zip(params.items(), ref_grads[1:]):
            if ref is None:
                assert name not in grads or not grads[name].any(), name
            else:
                torch.testing.assert_close(grads[name], ref, atol=1e-5, rtol=1e-4, msg=name)
    assert layer.default_vectors.abs().sum() > 0


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "deepseek_v2", "sqrtsoftplus", "sigmoid_top1", "gpt_oss"])
@pytest.mark.parametrize("dispatcher", ["allgather", "alltoall"])
def test_family_matches_independent_reference(family, dispatcher):
    """Output, EMA and router / expert / input gradients over three steps, in ``auto`` mode."""
    config = family_config(family, moe_token_dispatcher_type=dispatcher)
    _, layer = build(config, DefaultMoEConfig(beta=0.7, probes=0))
    assert layer.mode == ("forward" if family == "deepseek_v2" else "backward-only")
    check_against_reference(layer)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v2"])
def test_backward_only_and_router_weighting_match_reference(family):
    config = family_config(family)
    _, layer = build(config, DefaultMoEConfig(beta=0.7, mode="backward-only", ema_weighting="router"))
    check_against_reference(layer, weighting="router")


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("gate", [False, True])
def test_shared_experts_gated_and_overlapped(overlap, gate):
    config = family_config(
        "deepseek_v3", moe_shared_expert_gate=gate, moe_shared_expert_overlap=overlap, moe_token_dispatcher_type="alltoall"
    )
    _, layer = build(config, DefaultMoEConfig(beta=0.7, probes=0))
    check_against_reference(layer, steps=2)


def _grouped_all(family):
    e = FAMILIES[family]["num_moe_experts"]
    extra = dict(moe_router_topk=e)
    if FAMILIES[family].get("moe_router_num_groups"):
        extra["moe_router_group_topk"] = FAMILIES[family]["moe_router_num_groups"]
    return extra


@pytest.mark.parametrize("family", list(FAMILIES))
def test_k_equals_n_is_stock_bit_for_bit(family):
    config = family_config(family, **_grouped_all(family))
    stock, layer = build(config, DefaultMoEConfig(beta=0.5))  # a sigmoid router's probes step aside: none to draw
    assert layer.probes is None
    for step in range(2):
        x, g = inputs(step)
        out_s, grads_s, xg_s = run(stock, x, g)
        out_d, grads_d, xg_d = run(layer, x, g)
        assert torch.equal(out_s, out_d) and torch.equal(xg_s, xg_d)
        for name, grad in grads_s.items():
            assert torch.equal(grad, grads_d[name]), name
    assert layer.default_vectors.abs().sum() > 0


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "sqrtsoftplus", "gpt_oss"])
def test_backward_only_forward_is_stock_and_only_the_router_gradient_moves(family):
    stock, layer = build(family_config(family), DefaultMoEConfig(beta=0.5, probes=0))
    assert layer.mode == "backward-only"
    for step in range(3):
        x, g = inputs(step)
        out_s, grads_s, _ = run(stock, x, g)
        out_d, grads_d, _ = run(layer, x, g)
        assert torch.equal(out_s, out_d)
        for name, grad in grads_s.items():
            if name.startswith("router."):
                continue
            assert torch.equal(grad, grads_d[name]), name
    assert not torch.equal(grads_s["router.weight"], grads_d["router.weight"])


def test_expert_bias_update_still_counts_tokens():
    _, layer = build(family_config("deepseek_v3"))
    x, g = inputs(0)
    run(layer, x, g)
    counts = layer.router.local_tokens_per_expert
    assert int(counts.sum()) == x.shape[0] * x.shape[1] * layer.config.moe_router_topk


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "deepseek_v2"])
@pytest.mark.parametrize("policy, pad", [("probs", False), ("position", False), ("probs", True)])
def test_dropped_pairs_get_exactly_the_prob_they_lost(family, policy, pad):
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    config = family_config(
        family,
        moe_expert_capacity_factor=0.5,
        moe_token_drop_policy=policy,
        moe_pad_expert_input_to_capacity=pad,
    )
    _, layer = build(config, DefaultMoEConfig(beta=0.5))
    x, g = inputs(0)
    router = layer.router
    logits = router.gating(x)
    probs, routing_map = router.routing(logits)
    weights = router.default_weights
    pre_drop, _ = topk_routing_with_score_function(
        logits.view(-1, config.num_moe_experts),
        config.moe_router_topk,
        use_pre_softmax=config.moe_router_pre_softmax,
        num_groups=config.moe_router_num_groups,
        group_topk=config.moe_router_group_topk,
        scaling_factor=config.moe_router_topk_scaling_factor,
        score_function=config.moe_router_score_function,
        expert_bias=router.expert_bias,
    )
    dropped = (pre_drop != 0) & (probs == 0)
    assert dropped.any(), "the capacity factor dropped nothing: the test checks nothing"
    torch.testing.assert_close(weights[dropped], pre_drop[dropped].float(), rtol=1e-6, atol=0)
    assert (weights[probs != 0] == 0).all()
    if pad:
        assert (routing_map & (probs == 0)).any()  # pad-to-capacity rows: computed, prob 0
    out, grads, _ = run(layer, x, g)
    assert torch.isfinite(out).all() and layer.default_vectors.abs().sum() > 0


@pytest.mark.parametrize("probes", [0, None])
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v2"])
@pytest.mark.parametrize("dispatcher", ["allgather", "alltoall"])
def test_padding_never_reaches_the_default_vectors(family, dispatcher, probes):
    """Padded tokens (mask True) are excluded from ``Ê``; real outputs ignore padded content. The
    routed rows' EMA (``probes=0``) also equals a run on the real tokens alone; the family's
    default (probes and the fit) never draws a padded token (its default weight is 0), and the
    draw depends on the batch's length, so there the padded content alone is varied."""
    config = family_config(family, moe_token_dispatcher_type=dispatcher)
    seq, batch, real = 6, 2, 4
    x, g = inputs(0, seq=seq, batch=batch)
    padding_BS = torch.zeros(batch, seq, dtype=torch.bool)
    padding_BS[:, real:] = True
    layers = []
    for fill in (0.0, 5.0):
        _, layer = build(config, DefaultMoEConfig(beta=0.5, probes=probes))
        x_fill = x.clone()
        x_fill[real:] = fill + torch.randn(seq - real, batch, x.shape[-1])
        out, _, _ = run(layer, x_fill, g, padding_mask=padding_BS)
        layers.append((layer, out))
    (first, out_a), (second, out_b) = layers
    # equal up to the order of fp32 sums (padded rows sit elsewhere in the expert-major rows)
    torch.testing.assert_close(first.default_vectors, second.default_vectors, atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(out_a[:real], out_b[:real], atol=1e-8, rtol=1e-6)
    from megatron_default_moe.config import probed_by_default

    probed = probes != 0 and probed_by_default(config)  # deepseek_v2: pre-softmax, the paper's method
    assert (first.probes is not None) == probed and first.default_vectors.abs().sum() > 0
    if probed:
        return
    _, only_real = build(config, DefaultMoEConfig(beta=0.5, probes=0))
    run(only_real, x[:real].contiguous(), g[:real].contiguous())
    torch.testing.assert_close(first.default_vectors, only_real.default_vectors, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3", "mixtral", "sqrtsoftplus"])
def test_padded_tokens_get_no_default_weight_and_no_default_gradient(family, monkeypatch):
    """At padded tokens the default weights are exactly 0 and so is the default term's logits
    gradient (Megatron routes padded tokens like real ones; only ``default_op_inputs`` marks them
    chosen); at real tokens both are nonzero. The gradient is the router's total logits gradient
    minus Megatron's own, as ``DefaultTermInputs.logits_grad`` forms it."""
    from megatron_default_moe.router import DefaultTermInputs

    config = family_config(family)
    seq, batch, real = 6, 2, 4
    x, g = inputs(1, seq=seq, batch=batch)
    padding_BS = torch.zeros(batch, seq, dtype=torch.bool)
    padding_BS[:, real:] = True
    padded_T = padding_BS.T.reshape(-1)  # token order [S, B] -> T, as the router flattens it
    _, layer = build(config, DefaultMoEConfig(beta=0.5))
    weights, extra = [], []
    inner_routing, inner_grad = layer.router.routing, DefaultTermInputs.logits_grad

    def routing(logits, *args, **kwargs):
        out = inner_routing(logits, *args, **kwargs)
        weights.append(layer.router.default_weights.detach().clone())
        return out

    def logits_grad(self, grad):
        total = inner_grad(self, grad)
        extra.append((total - grad).reshape(-1, config.num_moe_experts).detach().clone())
        return total

    monkeypatch.setattr(layer.router, "routing", routing)
    monkeypatch.setattr(DefaultTermInputs, "logits_grad", logits_grad)
    run(layer, x, g, padding_mask=padding_BS)
    (w_TE,), (extra_TE,) = weights, extra
    assert layer.default_vectors.abs().sum() > 0  # the term is live (update before use)
    assert torch.equal(w_TE[padded_T], torch.zeros_like(w_TE[padded_T]))
    assert torch.equal(extra_TE[padded_T], torch.zeros_like(extra_TE[padded_T]))
    assert (w_TE[~padded_T].abs().sum(-1) > 0).all()
    assert (extra_TE[~padded_T].abs().sum(-1) > 0).all()


def test_expert_bias_counts_only_real_tokens_with_padding():
    """DeepSeek-V3 routing (sigmoid, expert bias) with a padding mask trains through the layer:
    Megatron 0.19's stock ``_apply_expert_bias`` broadcasts a ``[T]`` mask against the ``[T, E]``
    map and raises (``compat.expert_bias_padding_mask``); the bias counter then sees the real
    tokens' selections only."""
    config = family_config("deepseek_v3")
    seq, batch, real = 6, 2, 4
    x, g = inputs(2, seq=seq, batch=batch)
    padding_BS = torch.zeros(batch, seq, dtype=torch.bool)
    padding_BS[:, real:] = True
    padded_T = padding_BS.T.reshape(-1)
    _, layer = build(config, DefaultMoEConfig(beta=0.5))
    assert layer.router.enable_expert_bias
    maps = []
    inner = layer.router.routing

    def routing(logits, *args, **kwargs):
        probs, routing_map = inner(logits, *args, **kwargs)
        maps.append(routing_map.detach().clone())
        return probs, routing_map

    layer.router.routing = routing
    out, _, _ = run(layer, x, g, padding_mask=padding_BS)
    (routing_map,) = maps
    assert torch.isfinite(out).all() and layer.default_vectors.abs().sum() > 0
    want = routing_map[~padded_T].sum(0).float()
    assert routing_map[padded_T].any() and want.sum() == real * batch * config.moe_router_topk
    assert torch.equal(layer.router.local_tokens_per_expert.float(), want)


@pytest.mark.parametrize("aux", ["aux_loss", "seq_aux_loss", "global_aux_loss", ["aux_loss", "seq_aux_loss"]])
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_z_loss_and_aux_losses_leave_the_default_gradient_unchanged(aux, family):
    """The extra router gradient (Default − stock) is the same with and without z-/aux losses."""
    coeff = [1e-2, 1e-2] if isinstance(aux, list) else 1e-2

    def extra_router_grad(**losses):
        stock, layer = build(family_config(family, **losses), DefaultMoEConfig(beta=0.5))
        for step in range(2):
            x, g = inputs(step)
            _, grads_s, _ = run(stock, x, g)
            _, grads_d, _ = run(layer, x, g)
        return grads_d["router.weight"] - grads_s["router.weight"], grads_s["router.weight"]

    plain, stock_plain = extra_router_grad()
    with_losses, stock_losses = extra_router_grad(
        moe_router_load_balancing_type=aux, moe_aux_loss_coeff=coeff, moe_z_loss_coeff=1e-2
    )
    assert not torch.allclose(stock_plain, stock_losses)  # the losses do act on the router
    torch.testing.assert_close(with_losses, plain, atol=1e-6, rtol=1e-5)


def test_quantile_balancing_follows_the_rule():
    config = family_config("mixtral", moe_router_load_balancing_type="quantile_balancing", moe_aux_loss_coeff=0.0)
    _, layer = build(config, DefaultMoEConfig(beta=0.5))
    x, g = inputs(0)
    logits = layer.router.gating(x).view(-1, config.num_moe_experts)
    probs, routing_map = layer.router.routing(logits)
    pi = torch.softmax(logits.float(), -1)
    S_A = (pi * routing_map).sum(-1, keepdim=True)
    torch.testing.assert_close(probs, (pi / S_A * routing_map).to(probs.dtype))  # probs follow f
    torch.testing.assert_close(layer.router.default_weights, (pi / S_A * ~routing_map).detach())
    out, _, _ = run(layer, x, g)
    assert torch.isfinite(out).all() and layer.default_vectors.abs().sum() > 0


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "sqrtsoftplus", "sigmoid_top1"])
def test_forward_mode_with_a_renormalised_router_names_the_flag(family):
    with pytest.raises(ValueError, match="--moe-default-mode"):
        DefaultMoELayer(family_config(family), moe_submodules(FAMILIES[family]["num_moe_experts"]),
                        dm_config=DefaultMoEConfig(mode="forward"))


@pytest.mark.parametrize(
    "override, flag",
    [
        (dict(moe_apply_probs_on_input=True), "--moe-apply-probs-on-input"),
        (dict(moe_router_load_balancing_type="sinkhorn"), "--moe-router-load-balancing-type"),
    ],
)
def test_still_rejected(override, flag):
    config = family_config("sigmoid_top1", **override)  # Llama-4-like: sigmoid top-1
    with pytest.raises(ValueError, match=flag):
        DefaultMoELayer(config, moe_submodules(8))


# -- evidence: the dense target and the size of the extra gradient -----------------------------
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "deepseek_v2", "sqrtsoftplus"])
def test_default_with_oracle_vectors_is_the_dense_gradient(family):
    """Invariant 3: with ``Ê_i = E_i(x)`` (all tokens equal to ``x``), Default MoE's router gradient
    is the dense one: the dense mixture (pre-softmax) or DenseMixer's target (renormalised)."""
    from megatron_default_moe.analysis.diagnostics import router_gradient_cosines, router_gradients

    _, layer = build(family_config(family), DefaultMoEConfig(beta=0.5))
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 1, 16, generator=gen).expand(6, 2, 16).contiguous()
    g = torch.randn(6, 2, 16, generator=gen)
    with torch.no_grad():
        for i in range(layer.config.num_moe_experts):
            layer.default_vectors[i] = ref_expert(layer, i, x[0, 0])

    def loss_fn(model):
        return (model(x)[0] * g).sum()

    cos = router_gradient_cosines(layer, loss_fn)[0]
    assert cos["default"] == pytest.approx(1.0, abs=1e-6)
    assert cos["topk"] < 0.999 and cos["extra_ratio"] > 0
    # and the dense target itself, from the reference: w = p on A, c·f/sg(N) elsewhere
    dense = router_gradients(layer, loss_fn, dense=[layer])[0]
    x_TH = x.reshape(-1, 16)
    f, mask, p, c, N = ref_routing(layer, x_TH)
    E = torch.stack([ref_expert(layer, i, x_TH) for i in range(layer.config.num_moe_experts)], 1).detach()
    w = p + c * f / N.detach() * ~mask
    want = torch.autograd.grad((torch.einsum("te,teh->th", w, E) * g.reshape(-1, 16)).sum(), layer.router.weight)[0]
    torch.testing.assert_close(dense, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_extra_router_gradient_ratio_is_logged(family):
    """``last_extra_grad_ratio`` = ‖extra logit gradient‖ / ‖stock logit gradient‖, from hooks."""
    from megatron_default_moe.analysis.metrics import layer_stats

    stock, layer = build(family_config(family), DefaultMoEConfig(beta=0.5))
    grads = {}
    for name, module in (("stock", stock), ("default", layer)):
        routing = module.router.routing

        def capture(logits, *args, name=name, routing=routing, **kwargs):
            logits.register_hook(lambda gr: grads.__setitem__(name, gr.clone()))
            return routing(logits, *args, **kwargs)

        module.router.routing = capture
    x, g = inputs(0)
    run(layer, x, g)  # a first step: Ê is set before use, the term is already there
    layer.track_metrics = True
    run(stock, x, g)
    run(layer, x, g)
    want = (grads["default"] - grads["stock"]).norm() / grads["stock"].norm()
    assert float(want) > 0
    ratio = layer.router.last_extra_grad_ratio
    assert isinstance(ratio, torch.Tensor) and ratio.dim() == 0  # no host sync in the backward
    assert float(ratio) == pytest.approx(float(want), rel=1e-4)
    assert layer_stats(layer)["extra_router_grad_ratio"] == pytest.approx(float(want), rel=1e-4)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_normaliser_all_divides_by_every_experts_score(family):
    """``--moe-default-normaliser all``: ``w = c·f / sg(Σ_all f)``; smaller than DenseMixer's, the
    stock forward untouched, ``K = N`` still stock."""
    stock, layer = build(family_config(family), DefaultMoEConfig(beta=0.5, normaliser="all", probes=0))
    x, g = inputs(0)
    logits = layer.router.gating(x)
    probs, routing_map = layer.router.routing(logits)
    f, mask, p, c, N = ref_routing(layer, x.reshape(-1, 16))
    eps = 1e-20 if layer.config.moe_router_score_function != "softmax" else 0.0
    want = c * f / (f.sum(-1, keepdim=True) + eps) * ~mask
    torch.testing.assert_close(layer.router.default_weights, want.detach(), atol=1e-6, rtol=1e-5)
    assert (want <= c * f / N * ~mask + 1e-7).all()
    out_s, _, _ = run(stock, x, g)
    out_d, _, _ = run(layer, x, g)
    assert torch.equal(out_s, out_d)


def test_bad_normaliser_names_the_flag():
    with pytest.raises(ValueError, match="--moe-default-normaliser"):
        DefaultMoEConfig(normaliser="none")


def test_the_term_gradient_changed_in_place_before_the_router_reads_it_raises():
    """The router's backward reads the layer output's gradient the term's backward handed it (the
    term's ``dL/dw`` is formed there); if something wrote into it in between, the step fails loudly
    instead of using the changed values."""
    from megatron_default_moe.router import DefaultTermInputs

    inputs = DefaultTermInputs(torch.randn(6, 4))
    grad_TH, table_KH = torch.randn(6, 8), torch.randn(4, 8)
    inputs.receive_grad(grad_TH, table_KH)
    grad_TH.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        inputs.logits_grad(torch.zeros(6, 4))
