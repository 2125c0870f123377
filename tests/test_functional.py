"""The pure Default MoE math (no Megatron) against a straightforward loop reference of paper §1."""

import pytest
import torch

from helpers import OpNames

from megatron_default_moe import functional as F
from megatron_default_moe.estimators.routed_rows import expert_output_stats_EH1


def reference_layer(x_TH, router_EH, experts, topk, defaults_EH, beta, weighting="uniform"):
    """One Default MoE forward written token by token: returns (y_TH, new_defaults_EH, pi_TE)."""
    num_tokens, num_experts = x_TH.shape[0], router_EH.shape[0]
    pi_TE = torch.softmax(x_TH @ router_EH.T, dim=-1)
    chosen = [set(pi_TE[t].topk(topk).indices.tolist()) for t in range(num_tokens)]
    sums = [torch.zeros(x_TH.shape[1]) for _ in range(num_experts)]
    weights = [0.0] * num_experts
    outputs = {}
    for t in range(num_tokens):
        for i in chosen[t]:
            o = experts[i](x_TH[t])
            outputs[t, i] = o
            w = 1.0 if weighting == "uniform" else pi_TE[t, i].detach()
            sums[i] = sums[i] + w * o.detach()
            weights[i] += float(w)
    new_EH = defaults_EH.clone()
    for i in range(num_experts):
        if weights[i] > 0:
            new_EH[i] = beta * defaults_EH[i] + (1 - beta) * sums[i] / weights[i]
    ys = []
    for t in range(num_tokens):
        y = torch.zeros(x_TH.shape[1])
        for i in range(num_experts):
            y = y + pi_TE[t, i] * (outputs[t, i] if i in chosen[t] else new_EH[i])
        ys.append(y)
    return torch.stack(ys), new_EH, pi_TE


def functional_layer(x_TH, router_EH, experts, topk, defaults_EH, beta, weighting="uniform", mode="forward"):
    """The same forward assembled from ``megatron_default_moe.functional`` the way the layer does:
    experts see their rows multiplied by the prob (as Megatron's experts do)."""
    logits_TE = x_TH @ router_EH.T
    pi_TE = torch.softmax(logits_TE, dim=-1)
    topv, topi = pi_TE.topk(topk, dim=-1)
    probs_TE = torch.zeros_like(pi_TE).scatter(1, topi, topv)
    rows_t, rows_e = probs_TE.T.nonzero(as_tuple=True)  # expert-major rows, like the dispatcher
    token_R, expert_R = rows_e, rows_t
    probs_R = probs_TE[token_R, expert_R]
    out_RH = torch.stack([experts[e](x_TH[t]) for t, e in zip(token_R.tolist(), expert_R.tolist())])
    out_RH = out_RH * probs_R.unsqueeze(-1)
    tokens_per_expert = torch.bincount(expert_R, minlength=len(experts))
    stats = expert_output_stats_EH1(out_RH, probs_R, tokens_per_expert, 0, len(experts), weighting)
    new_EH = defaults_EH.clone()
    F.ema_update_(new_EH, stats, beta)
    y_topk = torch.zeros_like(x_TH).index_add(0, token_R, out_RH)
    w_TE = F.default_weights_TE(F.router_scores_TE(logits_TE, "softmax"), probs_TE)
    y = F.add_default_term(y_topk, w_TE, new_EH, mode)
    return y, new_EH, y_topk


def make_problem(seed=0, tokens=12, hidden=6, num_experts=4):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen)
    router = torch.randn(num_experts, hidden, generator=gen).requires_grad_()
    mats = [torch.randn(hidden, hidden, generator=gen).requires_grad_() for _ in range(num_experts)]
    experts = [lambda v, m=m: torch.tanh(v @ m) for m in mats]
    defaults = torch.randn(num_experts, hidden, generator=gen)
    return x, router, mats, experts, defaults


@pytest.mark.parametrize("weighting", ["uniform", "router"])
@pytest.mark.parametrize("topk", [1, 2])
def test_forward_ema_and_router_gradient_match_reference(weighting, topk):
    x, router, mats, experts, defaults = make_problem()
    y_ref, e_ref, _ = reference_layer(x, router, experts, topk, defaults, 0.8, weighting)
    g = torch.randn_like(y_ref)
    grads_ref = torch.autograd.grad((y_ref * g).sum(), [router, *mats])
    y, e, _ = functional_layer(x, router, experts, topk, defaults, 0.8, weighting)
    grads = torch.autograd.grad((y * g).sum(), [router, *mats])
    torch.testing.assert_close(e, e_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_every_router_gradient_column_is_nonzero():
    """dy/dπ: Ê_i for unselected experts, so every column of dL/dπ is non-zero (TopK: only K)."""
    x, router, _, experts, defaults = make_problem(tokens=5)
    pi = torch.softmax(x @ router.T, dim=-1).detach().requires_grad_()
    topv, topi = pi.topk(1, dim=-1)
    probs = torch.zeros_like(pi).scatter(1, topi, topv)
    y = F.default_term_TH(pi * (probs.detach() == 0), defaults) + probs @ torch.ones(4, 6)
    (grad_pi,) = torch.autograd.grad(y.sum(), pi, retain_graph=True)
    assert (grad_pi != 0).all()
    (grad_topk,) = torch.autograd.grad((probs @ torch.ones(4, 6)).sum(), pi)
    assert ((grad_topk != 0).sum(-1) == 1).all()


def test_default_term_sends_no_gradient_into_defaults():
    defaults = torch.randn(4, 3, requires_grad=True)
    w = torch.rand(5, 4, requires_grad=True)
    F.default_term_TH(w, defaults).sum().backward()
    assert defaults.grad is None and w.grad is not None


def test_invariants_k_equals_n_and_beta_one():
    x, router, _, experts, defaults = make_problem()
    zeros = torch.zeros_like(defaults)
    y, _, y_topk = functional_layer(x, router, experts, 4, defaults, 0.9)  # K = N: no default term
    torch.testing.assert_close(y, y_topk)
    y, e, y_topk = functional_layer(x, router, experts, 1, zeros, 1.0)  # β = 1 from zero init
    torch.testing.assert_close(y, y_topk)
    assert torch.equal(e, zeros)


def test_first_step_from_zero_is_one_minus_beta_times_mean():
    stats = torch.tensor([[2.0, 4.0, 2.0], [0.0, 0.0, 0.0], [3.0, 3.0, 1.0]])
    defaults = torch.zeros(3, 2)
    updated, nonfinite = F.ema_update_(defaults, stats, beta=0.75)
    torch.testing.assert_close(defaults, torch.tensor([[0.25, 0.5], [0.0, 0.0], [0.75, 0.75]]))
    assert updated.tolist() == [True, False, True] and not nonfinite.any()


def test_nonfinite_statistics_skip_the_expert():
    stats = torch.tensor([[float("nan"), 1.0, 1.0], [1.0, float("inf"), 2.0], [1.0, 1.0, 1.0]])
    defaults = torch.ones(3, 2)
    updated, nonfinite = F.ema_update_(defaults, stats, beta=0.5)
    assert torch.isfinite(defaults).all()
    torch.testing.assert_close(defaults[:2], torch.ones(2, 2))
    assert updated.tolist() == [False, False, True] and nonfinite.tolist() == [True, True, False]


def test_stats_skip_padding_rows_and_count_once_under_expert_tp():
    out = torch.tensor([[2.0, 2.0], [9.0, 9.0], [1.0, 3.0]])
    probs = torch.tensor([0.5, 0.0, 0.25])  # row 1 is capacity padding
    stats = expert_output_stats_EH1(out, probs, [2, 1], first_expert=2, num_experts=4)
    torch.testing.assert_close(stats, torch.tensor([[0, 0, 0], [0, 0, 0], [4, 4, 1], [4, 12, 1.0]]))
    partial = expert_output_stats_EH1(out, probs, [2, 1], first_expert=2, num_experts=4, count_rows=False)
    assert torch.equal(partial[:, :2], stats[:, :2]) and not partial[:, 2].any()
    router = expert_output_stats_EH1(out, probs, [2, 1], first_expert=2, num_experts=4, weighting="router")
    torch.testing.assert_close(router[2:], torch.tensor([[2, 2, 0.5], [1, 3, 0.25]]))


def test_backward_only_mode_changes_gradient_not_value():
    y = torch.randn(3, 2)
    w = torch.rand(3, 4, requires_grad=True)
    defaults = torch.randn(4, 2)
    out = F.add_default_term(y, w, defaults, "backward-only")
    assert torch.equal(out, y)
    out.sum().backward()
    torch.testing.assert_close(w.grad, defaults.sum(-1).expand(3, 4))


def test_mm_fp32_without_out_dtype_keyword(monkeypatch):
    """Torch < 2.8: ``torch.mm`` has no ``out_dtype`` (a genuine ``TypeError``); the bf16 backward
    then takes fp32 copies, and stops trying the keyword after the first call."""
    real_mm, calls = torch.mm, []

    def old_mm(a, b):  # torch 2.7's signature: no out_dtype
        calls.append(1)
        return real_mm(a, b)

    monkeypatch.setattr(F, "_MM_OUT_DTYPE", [True])
    monkeypatch.setattr(torch, "mm", old_mm)
    a, b = torch.randn(5, 7).bfloat16(), torch.randn(7, 3).bfloat16()
    for _ in range(2):
        got = F.mm_fp32(a, b)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, a.float() @ b.float(), rtol=0, atol=0)
    assert F._MM_OUT_DTYPE == [False] and calls == []  # the TypeError came before any call went through


def test_pure_math_imports_nothing_of_the_package():
    """``functional`` is the bottom layer: no import cycle through ``statistics`` or ``fused``."""
    import ast
    import pathlib

    tree = ast.parse(pathlib.Path(F.__file__).read_text())
    names = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    names += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [n for n in names if n and n.startswith("megatron_default_moe")], names


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_line_term_hands_its_two_gradients_to_the_sink(dtype):
    """With coordinates and a ``grad_sink``: the sink gets ``dL/dy`` itself, the table ``[A; B]`` and
    ``s``'s factors ``x``, ``d`` (it forms ``[g_A | g_B]``, ``s`` and ``g_A + s g_B`` in its one op,
    ``ops.ema.default_weights_backward``); the term passes ``dL/dy`` through unchanged and runs no
    matmul of its own."""
    torch.manual_seed(0)
    y, g = torch.randn(5, 8).to(dtype).requires_grad_(), torch.randn(5, 8).to(dtype)
    table, x, d = torch.randn(6, 8).to(dtype), torch.randn(5, 4).to(dtype), torch.randn(4).to(dtype)
    seen = []
    out = F.add_default_term(y, None, table, "backward-only", grad_sink=lambda *a: seen.append(a),
                             coordinates=F.Coordinates(x, d))  # fmt: skip
    with OpNames() as ops:
        out.backward(g)
    assert not [n for n in ops.names if "mm" in n], ops.names
    (grad, got_table, line), = seen
    assert grad is y.grad or torch.equal(grad, g)  # dL/dy as autograd handed it: no copy, no product
    assert torch.equal(got_table, table)
    # s's factors as they were (x: Megatron's router keeps it anyway), s not formed in the forward
    assert line.s_T1 is None and torch.equal(line.x_TH, x) and torch.equal(line.d_H, d)
    assert torch.equal(y.grad, g)
