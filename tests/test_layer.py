"""Single-rank ``DefaultMoELayer`` on real megatron-core (CPU, gloo): paper §1.5 invariants,
an independent reference of the whole layer, eval freeze, recompute parity, guards."""

import collections

import pytest
import torch
import torch.nn.functional as TF
from helpers import OpNames, build_layers, moe_config

from megatron_default_moe import (
    DefaultMoEConfig,
    DefaultMoELayer,
    update_default_vectors,
)

pytestmark = pytest.mark.usefixtures("megatron_cpu")
DISPATCHERS = ["allgather", "alltoall"]


def run(layer, x_SBH, grad_SBH):
    """Forward + backward with a fixed upstream gradient; returns output and all parameter grads."""
    layer.zero_grad(set_to_none=True)
    x_SBH = x_SBH.clone().requires_grad_()
    out, _ = layer(x_SBH)
    (out * grad_SBH).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return out.detach(), grads, x_SBH.grad


def reference(layer, x_SBH, defaults_EH, beta, weighting="uniform"):
    """The Default MoE layer recomputed from its weights, token by token, with plain torch."""
    config = layer.config
    x_TH = x_SBH.reshape(-1, config.hidden_size)
    pi_TE = torch.softmax(x_TH @ layer.router.weight.T, dim=-1)
    top_TK = pi_TE.topk(config.moe_router_topk, dim=-1).indices

    def expert(i, v_H):
        mlp = layer.experts.local_experts[i]
        return TF.gelu(v_H @ mlp.linear_fc1.weight.T) @ mlp.linear_fc2.weight.T

    outs = {(t, int(i)): expert(int(i), x_TH[t]) for t in range(len(x_TH)) for i in top_TK[t]}
    new_EH = defaults_EH.clone()
    for i in range(config.num_moe_experts):
        rows = [(t, o) for (t, e), o in outs.items() if e == i]
        if rows:
            w = [1.0 if weighting == "uniform" else float(pi_TE[t, i]) for t, _ in rows]
            m = sum(wi * o.detach() for wi, (_, o) in zip(w, rows)) / sum(w)
            new_EH[i] = beta * defaults_EH[i] + (1 - beta) * m
    y = torch.stack(
        [
            sum(pi_TE[t, i] * (outs[t, i] if (t, i) in outs else new_EH[i]) for i in range(config.num_moe_experts))
            for t in range(len(x_TH))
        ]
    )
    return y.view_as(x_SBH), new_EH


def inputs(seed=1, seq=6, batch=2, hidden=16):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(seq, batch, hidden, generator=gen), torch.randn(seq, batch, hidden, generator=gen)


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
@pytest.mark.parametrize("weighting", ["uniform", "router"])
def test_layer_matches_independent_reference_over_steps(dispatcher, weighting):
    """Output, EMA (update before use) and router / expert / input gradients, three steps."""
    config = moe_config(moe_token_dispatcher_type=dispatcher)
    beta = 0.7
    _, layer = build_layers(config, DefaultMoEConfig(beta=beta, ema_weighting=weighting))
    defaults = torch.zeros(config.num_moe_experts, config.hidden_size)
    for step in range(3):
        x, g = inputs(seed=step)
        out, grads, x_grad = run(layer, x, g)
        ref_params = dict(layer.named_parameters())
        x_ref = x.clone().requires_grad_()
        y_ref, defaults = reference(layer, x_ref, defaults, beta, weighting)
        ref_grads = torch.autograd.grad((y_ref * g).sum(), [x_ref, *ref_params.values()], allow_unused=True)
        torch.testing.assert_close(layer.default_vectors, defaults, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out, y_ref.detach(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(x_grad, ref_grads[0], atol=1e-5, rtol=1e-4)
        for (name, _), ref in zip(ref_params.items(), ref_grads[1:]):
            torch.testing.assert_close(grads[name], ref, atol=1e-5, rtol=1e-4, msg=name)
        if step == 0 and weighting == "uniform":
            assert layer.default_vectors.abs().sum() > 0


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
@pytest.mark.parametrize("case", ["k_equals_n", "beta_one"])
def test_reduces_to_stock_topk(dispatcher, case):
    """K = N, or β = 1 from zero init: the stock MoELayer's output and gradients, exactly."""
    topk, beta = (4, 0.9) if case == "k_equals_n" else (2, 1.0)
    config = moe_config(moe_token_dispatcher_type=dispatcher, moe_router_topk=topk)
    stock, default = build_layers(config, DefaultMoEConfig(beta=beta))
    for step in range(2):
        x, g = inputs(seed=10 + step)
        out_s, grads_s, xg_s = run(stock, x, g)
        out_d, grads_d, xg_d = run(default, x, g)
        assert torch.equal(out_s, out_d)
        assert torch.equal(xg_s, xg_d)
        assert grads_s.keys() == grads_d.keys()
        for name in grads_s:
            assert torch.equal(grads_s[name], grads_d[name]), name
    if case == "beta_one":
        assert not default.default_vectors.any()


def test_first_step_default_vectors_are_one_minus_beta_times_mean_output():
    config = moe_config(moe_router_topk=1)
    _, layer = build_layers(config, DefaultMoEConfig(beta=0.9))
    x, g = inputs(seed=3)
    run(layer, x, g)
    x_TH = x.reshape(-1, 16)
    chosen_T = (x_TH @ layer.router.weight.T).argmax(-1)
    for i in range(4):
        mlp = layer.experts.local_experts[i]
        rows = x_TH[chosen_T == i]
        if len(rows) == 0:
            assert not layer.default_vectors[i].any()
            continue
        mean = (TF.gelu(rows @ mlp.linear_fc1.weight.T) @ mlp.linear_fc2.weight.T).mean(0)
        torch.testing.assert_close(layer.default_vectors[i], 0.1 * mean.detach(), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_stats_stride_averages_every_nth_row_with_a_rotating_offset(dispatcher):
    """``stats_stride=3``: the EMA sees permuted rows ``o, o+3, ...`` (expert-major, token order),
    ``o`` = 0 on the first update, 1 on the second."""
    config = moe_config(moe_router_topk=1, moe_token_dispatcher_type=dispatcher)
    _, layer = build_layers(config, DefaultMoEConfig(beta=0.9, stats_stride=3))
    x, g = inputs(seed=3, seq=12)
    x_TH = x.reshape(-1, 16)
    chosen_T = (x_TH @ layer.router.weight.T).argmax(-1)
    rows = [(i, t) for i in range(4) for t in range(len(x_TH)) if chosen_T[t] == i]  # permuted order
    expected = torch.zeros(4, 16)
    for offset in (0, 1):
        run(layer, x, g)
        means = torch.zeros(4, 16)
        for i in range(4):
            mlp = layer.experts.local_experts[i]
            picked = [t for i_, t in rows[offset::3] if i_ == i]
            if picked:
                out = TF.gelu(x_TH[picked] @ mlp.linear_fc1.weight.T) @ mlp.linear_fc2.weight.T
                means[i] = out.detach().mean(0)
            expected[i] = 0.9 * expected[i] + 0.1 * means[i] if picked else expected[i]
        torch.testing.assert_close(layer.default_vectors, expected, atol=1e-6, rtol=1e-4)
    with pytest.raises(ValueError, match="--moe-default-stats-stride"):
        DefaultMoEConfig(stats_stride=0)


def test_default_term_adds_no_expert_gradient():
    """Expert grads equal the stock layer's (the term is stop-gradient); the router's differ."""
    config = moe_config(moe_router_topk=1, num_moe_experts=8)
    stock, default = build_layers(config, DefaultMoEConfig(beta=0.5))
    x, g = inputs(seed=4, seq=2, batch=1)  # 2 tokens, top-1: at most 2 of 8 experts routed
    run(default, x, g)  # step 1 fills some default vectors
    x, g = inputs(seed=5, seq=2, batch=1)
    _, grads_s, _ = run(stock, x, g)
    _, grads_d, _ = run(default, x, g)
    for name in grads_s:
        if name.startswith("experts."):
            assert torch.equal(grads_s[name], grads_d[name]), name
    assert default.default_vectors.any()
    assert not torch.allclose(grads_s["router.weight"], grads_d["router.weight"])


def test_router_gradient_columns_all_nonzero():
    """dL/dπ is non-zero for every expert once every expert has a default vector."""
    config = moe_config(moe_router_topk=1)
    _, layer = build_layers(config, DefaultMoEConfig(beta=0.5))
    layer.default_vectors.copy_(torch.randn(4, 16))
    captured = {}
    original = layer.router.routing

    def routing(logits, *args, **kwargs):
        logits.retain_grad()
        captured["logits"] = logits
        return original(logits, *args, **kwargs)

    layer.router.routing = routing
    x, g = inputs(seed=6, seq=1, batch=1)  # one token: TopK routes it to a single expert
    run(layer, x, g)
    pi = torch.softmax(captured["logits"].detach().reshape(-1, 4), -1)
    grad_logits = captured["logits"].grad.reshape(-1, 4)
    grad_pi = grad_logits / pi  # softmax backward: dz_i = π_i (dπ_i - Σ π dπ); centre removed
    assert torch.unique(grad_pi.round(decimals=5)).numel() == 4  # all four columns distinct


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_eval_freezes_default_vectors_and_still_adds_the_term(dispatcher):
    config = moe_config(moe_token_dispatcher_type=dispatcher)
    stock, layer = build_layers(config, DefaultMoEConfig(beta=0.5))
    run(layer, *inputs(seed=7))
    frozen = layer.default_vectors.clone()
    layer.eval()
    stock.eval()
    x, _ = inputs(seed=8)
    with torch.no_grad():
        out, _ = layer(x)
        out_stock, _ = stock(x)
    assert torch.equal(layer.default_vectors, frozen)
    y_ref, _ = reference(layer, x, frozen, beta=1.0)  # β = 1: reference keeps Ê as given
    torch.testing.assert_close(out, y_ref, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(out, out_stock)


@pytest.mark.parametrize("update", ["microbatch", "step"])
def test_recompute_matches_no_recompute_and_updates_once(update):
    """Megatron's MoE recompute (selective, 'moe'): same outputs, grads and Ê as without."""
    dm = DefaultMoEConfig(beta=0.6, update=update)
    _, plain = build_layers(moe_config(), dm)
    _, recomputed = build_layers(
        moe_config(recompute_granularity="selective", recompute_modules=["moe"]), dm
    )
    assert recomputed.moe_layer_recompute
    for step in range(3):
        x, g = inputs(seed=20 + step)
        out_p, grads_p, xg_p = run(plain, x, g)
        out_r, grads_r, xg_r = run(recomputed, x, g)
        if update == "step":
            update_default_vectors(plain)
            update_default_vectors(recomputed)
        assert torch.equal(out_p, out_r)
        assert torch.equal(xg_p, xg_r)
        for name in grads_p:
            assert torch.equal(grads_p[name], grads_r[name]), name
        assert torch.equal(plain.default_vectors, recomputed.default_vectors)
        assert len(recomputed._recompute_snapshots) == 0
    assert plain.default_vectors.any()


def test_gradient_accumulation_uses_each_microbatch_snapshot():
    """Two forwards, then two backwards (as under pipelining): the in-place EMA of micro-batch 2
    must not change micro-batch 1's gradients (detached snapshot)."""
    config = moe_config()
    dm = DefaultMoEConfig(beta=0.5)
    _, a = build_layers(config, dm)
    _, b = build_layers(config, dm)
    (x1, g1), (x2, g2) = inputs(seed=30), inputs(seed=31)
    _, grads1, _ = run(a, x1, g1)
    _, grads2, _ = run(a, x2, g2)
    b.zero_grad(set_to_none=True)
    out1, _ = b(x1)
    out2, _ = b(x2)
    (out2 * g2).sum().backward()
    (out1 * g1).sum().backward()
    for name, p in b.named_parameters():
        torch.testing.assert_close(p.grad, grads1[name] + grads2[name], atol=1e-6, rtol=1e-5)
    assert torch.equal(a.default_vectors, b.default_vectors)


def test_backward_only_mode_keeps_topk_output_and_forward_mode_gradients():
    config = moe_config()
    stock, backward_only = build_layers(config, DefaultMoEConfig(beta=0.5, mode="backward-only"))
    _, forward = build_layers(config, DefaultMoEConfig(beta=0.5))
    for step in range(2):
        x, g = inputs(seed=40 + step)
        out_s, _, _ = run(stock, x, g)
        out_b, grads_b, _ = run(backward_only, x, g)
        out_f, grads_f, _ = run(forward, x, g)
        assert torch.equal(out_b, out_s)
        assert not torch.allclose(out_f, out_s)
        for name in grads_f:
            torch.testing.assert_close(grads_b[name], grads_f[name], atol=1e-6, rtol=1e-5)


def test_step_mode_updates_once_per_step_from_all_microbatches():
    config = moe_config()
    beta = 0.8
    _, step = build_layers(config, DefaultMoEConfig(beta=beta, update="step"))
    xs = [inputs(seed=50 + i) for i in range(3)]
    for x, g in xs:
        run(step, x, g)
        assert not step.default_vectors.any()  # no update, no collective in the forward
    update_default_vectors(step)
    x_all = torch.cat([x for x, _ in xs], dim=1)
    _, expected = reference(step, x_all, torch.zeros(4, 16), beta)
    torch.testing.assert_close(step.default_vectors, expected, atol=1e-5, rtol=1e-4)


def test_default_vectors_buffer_is_fp32_persistent_and_shaped():
    config = moe_config(num_moe_experts=8, hidden_size=32, num_attention_heads=4)
    _, layer = build_layers(config)
    assert layer.default_vectors.shape == (8, 32) and layer.default_vectors.dtype == torch.float32
    assert "default_vectors" in layer.state_dict()
    layer.bfloat16()
    assert layer.default_vectors.dtype == torch.float32


@pytest.mark.parametrize(
    "override, flag",
    [
        (dict(moe_router_score_function="sigmoid", moe_default_mode_forward=True), "--moe-default-mode"),
        (dict(moe_apply_probs_on_input=True, moe_router_topk=1), "--moe-apply-probs-on-input"),
        (dict(moe_router_load_balancing_type="sinkhorn", moe_router_topk=1), "--moe-router-load-balancing-type"),
    ],
)
def test_guards_name_the_flag(override, flag):
    forward = override.pop("moe_default_mode_forward", False)
    config = moe_config(**override)
    with pytest.raises(ValueError, match=flag):
        build_layers(config, DefaultMoEConfig(mode="forward") if forward else None)


def test_bad_default_moe_settings_name_the_flag():
    with pytest.raises(ValueError, match="--moe-default-ema-beta"):
        DefaultMoEConfig(beta=1.5)
    with pytest.raises(ValueError, match="--moe-default-update"):
        DefaultMoEConfig(update="epoch")


def test_transformer_engine_grouped_experts():
    pytest.importorskip("transformer_engine", reason="Transformer Engine is not importable (GPU-only)")
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_with_transformer_engine_spec,
    )

    config = moe_config(moe_grouped_gemm=True)
    spec = get_gpt_layer_with_transformer_engine_spec(num_experts=4, moe_grouped_gemm=True)
    layer = DefaultMoELayer(config, spec.submodules.mlp.keywords["submodules"])
    out, _ = layer(torch.randn(4, 2, 16, device=layer.default_vectors.device))
    assert layer.default_vectors.any() and torch.isfinite(out).all()


@pytest.mark.parametrize("mode", ["forward", "backward-only"])
def test_hot_path_ops_per_forward_and_backward(mode):
    """What Default MoE adds to the stock layer's ops (the benchmark's kernel count): the weights
    only where the forward reads them, one statistics op, one EMA op, and in the backward one
    logits op that also forms the term's ``dL/dw`` (no matmul of its own), and no second gradient
    summed into the logits (autograd's ``add``)."""
    config = moe_config()
    stock, layer = build_layers(config, DefaultMoEConfig(beta=0.5, mode=mode))
    x, g = inputs(seed=7)
    counts = {}
    for name, module in (("stock", stock), ("default", layer)):
        x_in = x.clone().requires_grad_()
        with OpNames() as fwd:
            out, _ = module(x_in)
        with OpNames() as bwd:
            (out * g).sum().backward()
        counts[name] = fwd.names, bwd.names
    (fwd_s, bwd_s), (fwd_d, bwd_d) = counts["stock"], counts["default"]
    assert fwd_d.count("default_weights") == (mode == "forward")
    assert fwd_d.count("expert_stats") == 1 and fwd_d.count("ema_update") == 1
    assert fwd_d.count("addmm") - fwd_s.count("addmm") == (mode == "forward")
    assert bwd_d.count("default_weights_backward") == 1 and bwd_d.count("mm") == bwd_s.count("mm")
    assert bwd_d.count("add") == bwd_s.count("add"), "a second logits gradient was summed by autograd"
    free = {"view", "t", "detach", "slice", "expand", "lift_fresh"}  # metadata only: no kernel

    def extra(ours, stock):
        return sorted((collections.Counter(n for n in ours if n not in free) - collections.Counter(stock)).elements())

    assert extra(bwd_d, bwd_s) == ["default_weights_backward"]
    want = ["addmm", "default_weights"] if mode == "forward" else []
    assert extra(fwd_d, fwd_s) == sorted(want + ["ema_update", "expert_stats"])
