"""The fused ops (``ops/ema.py``): their references against an fp64 computation of the sampled rows,
and the Triton kernels against the references (on CPU under ``TRITON_INTERPRET=1``)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import OpNames

from megatron_default_moe.ops import ema as fused
from megatron_default_moe.estimators.routed_rows import expert_output_stats_EH1


def _rows(counts, hidden=24, pad_every=5, seed=0, extra=0):
    gen = torch.Generator().manual_seed(seed)
    rows = sum(counts) + extra
    out = torch.randn(rows, hidden, generator=gen).to(torch.bfloat16)
    p = torch.rand(rows, generator=gen) * 0.9 + 0.05
    p[::pad_every] = 0.0  # padding rows
    return out, p


def _fp64_reference(out, p, counts, first, E, uniform, stride, offset):
    """Per expert: sum of (1/p or 1) * out and the count (Σ[p≠0] or Σp) over rows offset::stride."""
    ref = torch.zeros(E, out.shape[1] + 1, dtype=torch.float64)
    start = 0
    for l, c in enumerate(counts):
        for r in range(start, start + c):
            if r % stride != offset or p[r] == 0:
                continue
            w = 1.0 / float(p[r]) if uniform else 1.0
            ref[first + l, :-1] += w * out[r].double()
            ref[first + l, -1] += 1.0 if uniform else float(p[r])
        start += c
    return ref


@pytest.mark.parametrize("weighting", ["uniform", "router"])
@pytest.mark.parametrize("stride,offset", [(1, 0), (3, 0), (3, 2), (8, 5)])
def test_sampled_statistics_match_fp64(weighting, stride, offset):
    counts = [7, 0, 13, 21]
    out, p = _rows(counts)
    got = expert_output_stats_EH1(out, p, counts, 2, 8, weighting=weighting, row_stride=stride, row_offset=offset)
    ref = _fp64_reference(out, p, counts, 2, 8, weighting == "uniform", stride, offset)
    assert got.dtype == torch.float32 and got.shape == (8, 25)
    torch.testing.assert_close(got.double(), ref, rtol=1e-3, atol=1e-3)
    assert got[[0, 1, 6, 7]].abs().sum() == 0  # not local: zero


class _StatsRows(OpNames):
    """Also records how many rows each ``expert_stats`` call was handed."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == "expert_stats":
            self.rows = args[0].shape[0]
        return super().__torch_dispatch__(func, types, args, kwargs)


def test_device_counts_rows_past_the_counts_are_ignored():
    """Counts as a tensor on the rows' device (a dispatcher's device-side ``tokens_per_expert``):
    never read on the host, so the op is handed every row, the 7 past the counts included (garbage,
    NaN and Inf among them), and must not count them."""
    counts = [5, 9, 4]
    out, p = _rows(counts, extra=7)
    out[-7:-4], out[-4:-2], out[-2:] = 1e4, float("nan"), float("inf")
    p[-7:] = 0.5
    on_device = torch.tensor(counts, dtype=torch.int32, device=out.device)
    with _StatsRows() as mode:
        got = expert_output_stats_EH1(out, p, on_device, 0, 3, row_stride=2, row_offset=1)
    assert mode.rows == len(range(1, out.shape[0], 2))  # nothing sliced on the host
    ref = _fp64_reference(out, p, counts, 0, 3, True, 2, 1)
    torch.testing.assert_close(got.double(), ref, rtol=1e-3, atol=1e-3)


def test_stride_one_equals_all_rows():
    """Stride 1 (the default, and given) is every row: against per-expert fp64 sums of each
    expert's rows, written without any row sampling."""
    counts = [11, 6, 17]
    out, p = _rows(counts)
    ref = torch.zeros(3, out.shape[1] + 1, dtype=torch.float64)
    start = 0
    for e, c in enumerate(counts):
        o, q = out[start : start + c].double(), p[start : start + c].double()
        keep = q != 0
        ref[e, :-1] = (o[keep] / q[keep, None]).sum(0)
        ref[e, -1] = keep.sum()
        start += c
    for sampling in ({}, dict(row_stride=1, row_offset=0)):
        got = expert_output_stats_EH1(out, p, counts, 0, 3, **sampling)
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="row_offset < row_stride"):
        expert_output_stats_EH1(out, p, counts, 0, 3, row_stride=2, row_offset=2)


@pytest.mark.parametrize("score", ["softmax", "sigmoid", "sqrtsoftplus"])
@pytest.mark.parametrize("renorm,all_experts,scale", [(False, False, 1.0), (True, False, 2.5), (True, True, 1.0)])
def test_default_weights_op_gradient_is_autograd_of_the_rule(score, renorm, all_experts, scale):
    """The op's explicit backward equals autograd through ``functional``'s rule."""
    from megatron_default_moe import functional as F

    torch.manual_seed(1)
    z = (torch.randn(19, 8, dtype=torch.float64) * 2).requires_grad_()
    sel = torch.zeros(19, 8, dtype=torch.bool).scatter_(1, z.detach().topk(2, dim=1).indices, True)
    probs = torch.where(sel, torch.rand(19, 8, dtype=torch.float64) + 0.1, 0.0)
    probs[3, z[3].argmax()] = 0.0  # dropped: a default pair that still counts in N
    eps = 1e-20 if score != "softmax" else 0.0
    g = torch.randn(19, 8, dtype=torch.float64)
    w_ref = F.default_weights_TE(F.router_scores_TE(z, score).double(), probs, sel, scale, renorm, eps,
                                 "all" if all_experts else "selected")  # fmt: skip
    (dz_ref,) = torch.autograd.grad(w_ref, z, g)
    z_op = z.detach().clone().requires_grad_()
    w_op = fused.default_weights(z_op, probs, sel, score, renorm, all_experts, scale, eps)
    (dz_op,) = torch.autograd.grad(w_op, z_op, g)
    torch.testing.assert_close(w_op.double(), w_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(dz_op.double(), dz_ref, rtol=1e-5, atol=1e-7)
    base = torch.randn(19, 8, dtype=torch.float64)  # Megatron's own logits gradient, added in the op
    dz_sum = fused.default_weights_backward(g, z.detach(), probs, sel, score, renorm, all_experts, scale, eps, base)
    torch.testing.assert_close(dz_sum, dz_ref + base, rtol=1e-5, atol=1e-7)
    w_bf16 = fused.default_weights(z.detach(), probs, sel, score, renorm, all_experts, scale, eps, torch.bfloat16)
    assert w_bf16.dtype == torch.bfloat16 and torch.equal(w_bf16, w_op.detach().bfloat16())


def test_fused_ops_are_single_opaque_ops():
    """Each fused op reaches a dispatch mode as one op (the benchmark counts one kernel)."""
    defaults, stats = torch.zeros(4, 6), torch.ones(4, 7)
    skips = torch.zeros(4, dtype=torch.long)
    out, p, counts = torch.randn(12, 6).bfloat16(), torch.rand(12), torch.tensor([5, 7])
    z, sel = torch.randn(12, 4), torch.zeros(12, 4, dtype=torch.bool)
    opts = ("softmax", False, False, 1.0, 0.0)
    with OpNames() as mode:
        snapshot, updated = fused.ema_update(defaults, stats, 0.9, skips, torch.bfloat16)
        fused.expert_stats(out, p, counts, 0, 1, 0, 2, True, True)
        fused.default_weights(z, sel, sel, *opts, torch.bfloat16)
        fused.default_weights_backward(z, z, sel, sel, *opts, z)
    assert mode.names == ["ema_update", "expert_stats", "default_weights", "default_weights_backward"]
    assert snapshot.dtype == torch.bfloat16 and updated.all()
    torch.testing.assert_close(defaults, torch.full((4, 6), 0.1))


def interpret(script: str, checked: int, timeout: int):
    """Run ``script`` under ``TRITON_INTERPRET=1`` in its own process; it must print ``CHECKED n``."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"CHECKED {checked}\n" in proc.stdout


TRITON_CHECK = textwrap.dedent(
    """
    import torch
    from megatron_default_moe.ops import ema as fused, launch as K
    torch.manual_seed(0)
    checked = 0

    def exact_stats(sampled, p, counts, offset, stride, uniform):
        # fp64 per local expert (one more row: past the counts) of the very same sampled rows
        rows_C = torch.arange(sampled.shape[0]) * stride + offset
        ids = torch.searchsorted(counts.cumsum(0), rows_C, right=True)
        p64 = p[rows_C].double()
        w = torch.where(p64 == 0, 0.0, 1 / p64 if uniform else p64 / p64)
        return torch.zeros(len(counts) + 1, sampled.shape[1], dtype=torch.float64).index_add_(
            0, ids, sampled.double() * w[:, None])
    for uniform in (True, False):
        for stride, offset in ((1, 0), (3, 1), (8, 7)):
            counts = torch.tensor([9, 0, 300, 41, 77])
            rows = int(counts.sum()) + 13
            p = torch.rand(rows) * 0.9 + 0.05
            p[::7] = 0.0
            p[5] = float("nan")  # a NaN prob of a local row stays NaN
            for dtype in (torch.bfloat16, torch.float32):
                out = torch.randn(rows, 200).to(dtype)  # 200 columns: a partial last block
                for counted in (rows - 13, rows):  # host-side counts slice; device-side keep all rows
                    sampled = out[offset:counted:stride]
                    for count_rows in (True, False):
                        args = (p, counts, offset, stride, 3, 11, uniform, count_rows)
                        ref = fused.expert_stats(sampled, *args)
                        got = K.expert_stats(sampled, *args)
                        assert got.shape == (11, 201) and got.dtype == torch.float32
                        # fp64 of the same rows: the kernel weights in fp32, the reference by hi + lo
                        exact = exact_stats(sampled, p, counts, offset, stride, uniform)
                        scale = exact[:5].nan_to_num().abs().max()
                        torch.testing.assert_close(got[3:8, :200].double(), exact[:5], rtol=1e-6, atol=1e-6 * scale,
                                                   equal_nan=True)  # fmt: skip
                        torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-5 * scale, equal_nan=True)
                        assert got[[0, 1, 2, 8, 9, 10]].eq(0).all()  # non-local experts stay zero
                        assert got[3, :200].isnan().all() == (offset <= 5 and (5 - offset) % stride == 0)  # row 5: NaN prob
                        checked += 1
    # a NaN row poisons its own expert only; rows past the counts never count, NaN or not
    counts = torch.tensor([9, 0, 300, 41, 77])
    rows = int(counts.sum()) + 13
    out, p = torch.randn(rows, 600), torch.rand(rows) * 0.9 + 0.05
    out[20, 5] = float("nan")  # local expert 2 (rows 9..308)
    out[-3] = float("nan")
    for kernel in (K.expert_stats, fused.expert_stats):
        got = kernel(out, p, counts, 0, 1, 3, 11, True, True)
        assert torch.isfinite(got[[3, 4, 6, 7]]).all() and not torch.isfinite(got[5, :600]).all(), kernel
    checked += 1
    # a hot expert (most rows: many chunks), one local expert, every expert local; run to run equal
    for counts, first, E in (([3, 1000, 0, 40], 1, 6), ([800], 0, 1), ([400, 5, 700], 0, 3)):
        counts = torch.tensor(counts)
        rows = int(counts.sum()) + 5
        out, p = torch.randn(rows, 72).bfloat16(), torch.rand(rows) * 0.9 + 0.05
        p[::5] = 0.0
        for stride, offset in ((1, 0), (2, 1)):
            sampled = out[offset::stride]
            assert int(counts.max()) // stride > 5 * K.stats_chunk(sampled.shape[0], 72)  # many chunks
            got = K.expert_stats(sampled, p, counts, offset, stride, first, E, True, True)
            assert torch.equal(got, K.expert_stats(sampled, p, counts, offset, stride, first, E, True, True))
            exact = exact_stats(sampled, p, counts, offset, stride, True)
            local = got[first : first + len(counts)]
            torch.testing.assert_close(local[:, :72].double(), exact[:-1], rtol=1e-6, atol=1e-6 * exact.abs().max())
            want = torch.zeros(len(counts) + 1).index_add_(
                0, torch.searchsorted(counts.cumsum(0), torch.arange(sampled.shape[0]) * stride + offset, right=True),
                (p[offset::stride][: sampled.shape[0]] != 0).float())
            assert torch.equal(local[:, 72], want[:-1])
            assert not got[:first].any() and not got[first + len(counts):].any()
            checked += 1
    # layouts: a non-contiguous in-place buffer is refused; read-only inputs may be any layout
    stats, d = torch.randn(6, 9), torch.randn(6, 16)[:, :8]
    try:
        K.ema_update_(d, stats, 0.9, torch.zeros(6, dtype=torch.long), torch.float32)
        raise AssertionError("a non-contiguous defaults_EH was accepted")
    except K.LayoutError as err:
        assert "defaults_EH" in str(err), err
    try:
        K.ema_update_(d.contiguous(), stats, 0.9, torch.zeros(12, dtype=torch.long)[::2], torch.float32)
        raise AssertionError("a non-contiguous skips_E was accepted")
    except K.LayoutError as err:
        assert "skips_E" in str(err), err
    d_ref, d_got = d.contiguous(), d.contiguous()
    fused.ema_update(d_ref, stats, 0.9, torch.zeros(6, dtype=torch.long), torch.float32)
    K.ema_update_(d_got, stats.t().contiguous().t(), 0.9, torch.zeros(6, dtype=torch.long), torch.float32)
    torch.testing.assert_close(d_got, d_ref, rtol=2e-7, atol=1e-7)
    counts, out = torch.tensor([30, 20]), torch.randn(50, 40)
    p = (torch.rand(100) + 0.1)[::2]  # strided probs
    got = K.expert_stats(out.t().contiguous().t(), p, counts.int()[:, None].expand(2, 2)[:, 0], 0, 1, 0, 2, True, True)
    torch.testing.assert_close(got, fused.expert_stats(out, p.contiguous(), counts, 0, 1, 0, 2, True, True),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    z, g = torch.randn(8, 6).t(), torch.randn(8, 6).t()  # non-contiguous logits and gradient
    sel = torch.zeros(6, 8, dtype=torch.bool)
    sel[:, 0] = True
    opts = ("softmax", True, False, 1.0, 0.0)
    torch.testing.assert_close(K.default_weights(z, sel, sel, *opts), fused.default_weights(z, sel, sel, *opts))
    torch.testing.assert_close(K.default_weights_backward(g, z, sel, sel, *opts, g),
                               fused.default_weights_backward(g, z, sel, sel, *opts, g))  # fmt: skip
    checked += 1
    for beta in (0.9, 0.3):
        stats = torch.randn(6, 700)
        stats[:, -1] = torch.tensor([3.0, 0.0, 5.0, 2.0, 0.0, 1.0])
        stats[2, 10] = float("nan")
        stats[3, -2] = float("inf")
        stats[4, 0] = float("nan")  # no tokens and NaN: not counted as a skip
        d_ref, d_got = torch.randn(6, 699), None
        d_got = d_ref.clone()
        s_ref, s_got = torch.arange(6), torch.arange(6)
        snap_ref, up_ref = fused.ema_update(d_ref, stats, beta, s_ref, torch.bfloat16)
        snap_got, up_got = K.ema_update_(d_got, stats, beta, s_got, torch.bfloat16)
        torch.testing.assert_close(d_got, d_ref, rtol=2e-7, atol=1e-7)
        torch.testing.assert_close(snap_got.float(), d_ref, rtol=2**-7, atol=0)  # bf16 (interpreter truncates)
        assert up_got.dtype == torch.bool, up_got.dtype
        assert torch.equal(up_got, up_ref), (up_got, up_ref)
        assert torch.equal(s_got, s_ref), (s_got, s_ref)
        assert up_ref.tolist() == [True, False, False, False, False, True] and s_ref.tolist() == [0, 1, 3, 4, 4, 5]
        checked += 1
    for score in ("softmax", "sigmoid", "sqrtsoftplus"):
        for renorm, all_experts, scale in ((False, False, 1.0), (True, False, 2.5), (True, True, 1.0)):
            for dtype in (torch.float32, torch.bfloat16):
                z = (torch.randn(37, 12) * 3).to(dtype)
                z[0, :] = 30.0  # softplus's linear branch, softmax ties
                sel = torch.zeros(37, 12, dtype=torch.bool)
                sel.scatter_(1, z.float().topk(3, dim=1).indices, True)
                probs = torch.where(sel, torch.rand(37, 12) + 0.1, 0.0)
                probs[1, z[1].float().argmax()] = 0.0  # a dropped pair
                eps = 1e-20 if score != "softmax" else 0.0
                opts = (score, renorm, all_experts, scale, eps)
                ref = fused.default_weights(z, probs, sel, *opts)
                got = K.default_weights(z, probs, sel, *opts)
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
                ref_map = fused.default_weights(z, sel, sel, *opts)  # the routing map as "probs != 0"
                torch.testing.assert_close(K.default_weights(z, sel, sel, *opts), ref_map, rtol=1e-5, atol=1e-7)
                g = torch.randn(37, 12)
                ref = fused.default_weights_backward(g, z, probs, sel, *opts)
                got = K.default_weights_backward(g, z, probs, sel, *opts)
                assert got.dtype == dtype
                tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-4)
                torch.testing.assert_close(got.float(), ref.float(), **tol)
                base = torch.randn(37, 12).to(dtype)  # Megatron's own logits gradient, added in the pass
                got = K.default_weights_backward(g, z, probs, sel, *opts, base)
                ref = fused.default_weights_backward(g, z, probs, sel, *opts, base)
                torch.testing.assert_close(got.float(), ref.float(), **tol)
                g2, s_T1 = torch.randn(37, 24), torch.randn(37, 1)  # shared-1: [g_A | g_B] and s
                got = K.default_weights_backward(g2, z, probs, sel, *opts, base, s_T1)
                ref = fused.default_weights_backward(g2[:, :12] + s_T1 * g2[:, 12:], z, probs, sel, *opts, base)
                torch.testing.assert_close(got.float(), ref.float(), **tol)
                torch.testing.assert_close(fused.default_weights_backward(g2, z, probs, sel, *opts, base, s_T1), ref)
                g2 = g2.bfloat16()  # the term hands [g_A | g_B] over in the activations' dtype
                got = K.default_weights_backward(g2, z, probs, sel, *opts, base, s_T1)
                ref = fused.default_weights_backward(g2.float(), z, probs, sel, *opts, base, s_T1)
                torch.testing.assert_close(got.float(), ref.float(), **tol)
                x, d = torch.randn(37, 600).to(dtype), torch.randn(600).to(dtype)  # s = x·d formed in the op
                got = K.default_weights_backward(g2, z, probs, sel, *opts, base, None, x, d)
                ref = fused.default_weights_backward(g2, z, probs, sel, *opts, base, x.float() @ d.float()[:, None])
                # s: a sum of 600 products in another order, an fp32 error relative to the largest
                sums = dict(rtol=tol["rtol"], atol=2e-5 * float(ref.float().abs().max()))
                torch.testing.assert_close(got.float(), ref.float(), **sums)
                torch.testing.assert_close(fused.default_weights_backward(g2, z, probs, sel, *opts, base, None, x, d),
                                           ref)  # fmt: skip
                # the term's dL/dy and table: dL/dw formed in the op (tl.dot over H; H not a multiple
                # of its block), [A; B] with s given, or s = x·d formed there too
                dy, x = torch.randn(37, 600).to(dtype), torch.randn(37, 600).to(dtype)
                table, d = torch.randn(24, 600).to(dtype), torch.randn(600).to(dtype)
                for line in (dict(table_KH=table[:12]), dict(table_KH=table, s_T1=s_T1),
                             dict(table_KH=table, x_TH=x, d_H=d)):  # fmt: skip
                    got = K.default_weights_backward(dy, z, probs, sel, *opts, base, **line)
                    g_TK = dy.float() @ line["table_KH"].float().t()
                    s = x.float() @ d.float()[:, None] if "x_TH" in line else line.get("s_T1")
                    g_TE = g_TK if s is None else g_TK[:, :12] + s * g_TK[:, 12:]
                    ref = fused.default_weights_backward(g_TE, z, probs, sel, *opts, base)
                    sums = dict(rtol=tol["rtol"], atol=2e-5 * float(ref.float().abs().max()))  # sums of 600, as above
                    torch.testing.assert_close(got.float(), ref.float(), **sums)
                    op = fused.default_weights_backward(dy, z, probs, sel, *opts, base, **line)
                    torch.testing.assert_close(op.float(), ref.float(), **sums)
                got = K.default_weights(z, probs, sel, *opts, torch.bfloat16)  # written in the reader's dtype
                assert got.dtype == torch.bfloat16
                torch.testing.assert_close(got.float(), fused.default_weights(z, probs, sel, *opts).float(),
                                           rtol=2**-7, atol=1e-7)  # fmt: skip
                checked += 1
    for dtype in (torch.float32, torch.bfloat16):  # the term's backward over several blocks of tokens
        z, dy = torch.randn(150, 40).to(dtype), torch.randn(150, 130).to(dtype)
        sel = torch.zeros(150, 40, dtype=torch.bool)
        sel.scatter_(1, z.float().topk(8, dim=1).indices, True)
        table, x, d = torch.randn(80, 130).to(dtype), torch.randn(150, 130).to(dtype), torch.randn(130).to(dtype)
        opts = ("softmax", True, False, 1.0, 0.0)
        assert -(-150 // K.default_weights_backward_launches(dy, z, sel, sel, *opts)[1][0].constexprs["BLOCK_T"]) > 2
        got = K.default_weights_backward(dy, z, sel, sel, *opts, None, None, x, d, table)
        ref = fused.default_weights_backward(dy.float(), z, sel, sel, *opts, None, None, x.float(), d.float(),
                                             table.float())  # fmt: skip
        rtol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got.float(), ref.float(), rtol=rtol, atol=2e-5 * float(ref.float().abs().max()))
        checked += 1
    # a table too large for the kernel (DeepSeek-V3's [A; B] is 512 x 7168): a GEMM forms [g_A | g_B] first
    assert K.table_in_kernel(128, 256) and not K.table_in_kernel(256, 512) and K.table_in_kernel(256, 256)
    for dtype in (torch.float32, torch.bfloat16):
        z, dy = torch.randn(40, 256).to(dtype), torch.randn(40, 70).to(dtype)
        sel = torch.zeros(40, 256, dtype=torch.bool)
        sel.scatter_(1, z.float().topk(8, dim=1).indices, True)
        table, x, d = torch.randn(512, 70).to(dtype), torch.randn(40, 70).to(dtype), torch.randn(70).to(dtype)
        opts = ("sigmoid", True, False, 2.5, 1e-20)
        launches = K.default_weights_backward_launches(dy, z, sel, sel, *opts, None, None, x, d, table)[1]
        assert len(launches) == 1 and not launches[0].constexprs["TABLE"] and launches[0].constexprs["HAS_S"]
        got = K.default_weights_backward(dy, z, sel, sel, *opts, None, None, x, d, table)
        g2 = dy @ table.t() if dtype == torch.bfloat16 else dy.float() @ table.float().t()  # bf16 as the old term
        ref = fused.default_weights_backward(g2, z, sel, sel, *opts, None, None, x, d)
        torch.testing.assert_close(got.float(), ref.float(), rtol=1e-5 if dtype == torch.float32 else 1e-2,
                                   atol=2e-5 * float(ref.float().abs().max()))  # fmt: skip
        checked += 1
    print("CHECKED", checked)
    """
)


def test_triton_kernels_match_references_in_the_interpreter():
    interpret(TRITON_CHECK, checked=80, timeout=1800)


DRAW_PRELUDE = """
import torch
from megatron_default_moe.ops import probe_draw as D
from megatron_default_moe.ops import launch as TL
from megatron_default_moe.ops.strata import TokenLayout, probe_strata
LAYOUTS = [((64, 1), 8, 1, TokenLayout()), ((30, 10), 16, 8, TokenLayout(1, 1, 2, 1, 2)),
           ((25, 2), 160, 1, TokenLayout(3, 0, 1, 0, 1))]  # each check adds a context-parallel case


def draw_inputs(T, E, seed, weighted, wdtype=torch.float32):
    \"\"\"``(weights, routing map, generator)``: uniform draws take the blocked pairs; every 7th
    token is padding (no eligible pair: a filler).\"\"\"
    gen = torch.Generator().manual_seed(seed % 1000 + T)
    w = torch.rand(T, E, generator=gen)
    routed = torch.rand(T, E, generator=gen) < 0.3
    w[routed] = 0
    w[::7] = 0
    w = w.to(wdtype)
    return (w if weighted else w == 0), routed, gen
"""

PROBE_DRAW_CHECK = DRAW_PRELUDE + textwrap.dedent("""
checked = 0
for (S, B), E, m, layout in LAYOUTS + [((12, 3), 3, 4, TokenLayout(0, 1, 3))]:
    strata = torch.tensor(probe_strata(layout, S, B, m)).view(-1, 4)
    T = S * B
    for weighted in (False, True):
        for wdtype in (torch.float32, torch.bfloat16):
            for seed in (0, 7, 2**63 - 5, 123456789012345):
                w, routed, _ = draw_inputs(T, E, seed, weighted, wdtype)
                ref = D.probe_draw_reference(w, routed, strata, m, B, seed, weighted)
                got = TL.probe_draw(w, routed, strata, m, B, seed, weighted)
                assert torch.equal(got[0], ref[0]), (T, E, seed)
                same = got[1] == ref[1]
                if not weighted:
                    assert same.all(), (T, E, seed, got[1], ref[1])
                    assert torch.equal(got[2], ref[2])
                else:
                    assert same.float().mean() >= 0.95, (T, E, seed)
                    torch.testing.assert_close(got[2], ref[2], rtol=1e-6, atol=1e-6)
                checked += 1
print("CHECKED", checked)
""")


PROBE_ADD_CHECK = DRAW_PRELUDE + textwrap.dedent("""
checked = 0
for (S, B), E, m, layout in LAYOUTS + [((12, 3), 3, 20, TokenLayout(0, 1, 3))]:  # strata longer than a block
    strata = torch.tensor(probe_strata(layout, S, B, m)).view(-1, 4)
    T = S * B
    for weighted, pdtype, seed in ((False, torch.float32, 7), (True, torch.bfloat16, 2**63 - 5)):
        w, routed, gen = draw_inputs(T, E, seed, weighted)
        probs = torch.where(routed, torch.rand(T, E, generator=gen), 0.0).to(pdtype)
        got = TL.probe_add(probs, routed, w, strata, m, B, seed, weighted)
        draw = TL.probe_draw(w, routed, strata, m, B, seed, weighted)
        for a, b in zip(got[2:], draw):  # the same draw as the draw's own kernel
            assert torch.equal(a, b), (T, E, seed)
        pair = (got[2], got[3])  # the copies: every row, each drawn pair set
        want = probs.index_put(pair, got[4].to(pdtype))
        if pdtype == torch.float32:
            assert torch.equal(got[0], want), (T, E, m)
        else:  # the interpreter casts to bf16 by truncation, CUDA to nearest: the pairs' probs within 1 ulp
            set_ = torch.zeros_like(routed).index_put(pair, torch.ones_like(got[2], dtype=torch.bool))
            assert torch.equal(got[0][~set_], want[~set_]), (T, E, m)
            torch.testing.assert_close(got[0].float(), want.float(), rtol=2**-7, atol=0)
        assert torch.equal(got[1], routed.index_put(pair, torch.ones_like(got[2], dtype=torch.bool))), (T, E, m)
        ref = D.probe_add_reference(probs, routed, w, strata, m, B, seed, weighted)
        assert torch.equal(got[2], ref[2])
        if not weighted:
            for a, b in zip(got, ref):
                assert torch.equal(a, b)
        checked += 1
print("CHECKED", checked)
""")


def test_probe_add_kernel_matches_its_reference_in_the_interpreter():
    """``probe_add``'s one kernel: the draw its own kernel makes, and whole copies of the probs
    (fp32, bf16) and routing map with each pair set, over strata cut by sequence- and
    context-parallel boundaries, strata longer than a program's block of positions, and fillers;
    bit for bit against ``probe_add_reference`` on uniform draws."""
    interpret(PROBE_ADD_CHECK, checked=8, timeout=600)


def test_probe_draw_kernel_matches_its_reference_in_the_interpreter():
    """The draw's Triton kernel against ``probe_draw_reference``: the same tokens always, the same
    experts and probs bit for bit on uniform draws (weighted: 95% of the picks at least, probs to
    fp32 rounding), token-major bf16/fp32 weights, padding tokens, seeds up to 2^63, strata cut by
    sequence- and context-parallel boundaries (fillers)."""
    interpret(PROBE_DRAW_CHECK, checked=64, timeout=900)


PROBE_EXCLUDE_CHECK = textwrap.dedent("""
import torch
from megatron_default_moe.ops import probes as D
from megatron_default_moe.ops import launch as TL
checked = 0
for counts, hidden, max_rows, first, E in (([7, 0, 13, 21], 24, 16, 2, 8), ([40] * 16, 70, 40, 0, 16), ([5, 9], 130, 8, 6, 8)):
    for dtype, line in ((torch.float32, False), (torch.bfloat16, False), (torch.float32, True), (torch.bfloat16, True)):
        for count_rows in (True, False):
            gen = torch.Generator().manual_seed(len(counts) + hidden)
            rows = sum(counts) + 3
            out = torch.randn(rows, hidden, generator=gen).to(dtype)
            p = torch.rand(rows, generator=gen) + 0.1
            probe = torch.randperm(rows, generator=gen)[: max_rows - 2]
            p[probe] = -(torch.rand(len(probe), generator=gen) + 0.5)
            p[-1] = -1.0  # a probe row past the counts: zeroed, never counted
            out[probe[0], 3] = float("nan")  # poisons its own expert only
            p_B, rows_B = p.topk(max_rows, largest=False, sorted=False)
            s_B = in_RH = None
            if line:  # the line's coordinates; a NaN one on a routed candidate row poisons nothing
                s_B = torch.randn(max_rows, generator=gen)
                s_B[(p_B > 0).nonzero()[:1, 0]] = float("nan")
                in_RH = torch.randn(rows, hidden, generator=gen).to(dtype)
            counts_L = torch.tensor(counts)
            ref_out, got_out = out.clone(), out.clone()
            if line:  # the probe rows' coordinates in one op: 0 at the other candidates
                d_H = torch.randn(hidden, generator=gen).to(dtype)
                want = torch.where(p_B < 0, (in_RH[rows_B].float() @ d_H.float()), 0.0)
                for coords in (D.probe_coordinates_reference, TL.probe_coordinates):
                    got_s = coords(in_RH, rows_B, p_B, d_H)
                    assert got_s.dtype == torch.float32 and torch.equal(got_s == 0, want == 0)
                    torch.testing.assert_close(got_s, want, rtol=1e-5, atol=1e-4)
            ref = D.probe_exclude_reference(ref_out, rows_B, p_B, counts_L, first, E, count_rows, s_B, in_RH)
            got = TL.probe_exclude(got_out, rows_B, p_B, counts_L, first, E, count_rows, s_B, in_RH)
            assert got.shape == ref.shape == ((E + 1, 2 * hidden + 3) if line else (E, hidden + 1))
            assert torch.equal(got_out, ref_out)
            ref_grad, got_grad = out.clone(), out.clone()  # the backward's zeroing: the same rows
            D.probe_zero_reference(ref_grad, rows_B, p_B)
            TL.probe_zero(got_grad, rows_B, p_B)
            assert torch.equal(got_grad, ref_grad) and torch.equal(got_grad, ref_out)
            assert torch.equal(got.isnan(), ref.isnan()), (got.isnan().nonzero(), ref.isnan().nonzero())
            torch.testing.assert_close(got.nan_to_num(), ref.nan_to_num(), rtol=1e-5, atol=1e-5)
            checked += 1
print("CHECKED", checked)
""")


def test_probe_exclude_kernel_matches_its_reference_in_the_interpreter():
    """The exclusion's Triton kernel against ``probe_exclude_reference``: the same zeroed rows bit
    for bit (a probe row past the counts too), the same NaN-poisoned experts, sums to fp32 rounding,
    with and without the ``shared-1`` line's columns; the backward's ``probe_zero`` kernel zeroes
    exactly those rows."""
    interpret(PROBE_EXCLUDE_CHECK, checked=24, timeout=900)


FIT_UPDATE_CHECK = textwrap.dedent("""
import torch
from megatron_default_moe.ops import fit as D
from megatron_default_moe.ops import launch as TL
checked = 0
for experts, hidden, beta, beta_fit in ((8, 24, 0.9, 0.99), (3, 70, 0.3, 0.3), (16, 130, 0.0, 0.7)):
    for dtype in (torch.float32, torch.bfloat16):
        gen = torch.Generator().manual_seed(experts + hidden)
        vectors, fit = torch.randn(experts, hidden, generator=gen), torch.randn(experts, 2 * hidden + 3, generator=gen)
        fit[:, -1] = torch.rand(experts, generator=gen) * 0.9 + 0.1  # the moments' weight (debias)
        fit[:, -2] = fit[:, -2].abs() + fit[:, -3] ** 2 / fit[:, -1]  # debiased m2 >= m1^2
        fit[1] = 0.0  # never updated (and none now): B = 0
        q = torch.randn(hidden, generator=gen)
        d = q / q.norm()
        stats = torch.randn(experts + 1, 2 * hidden + 3, generator=gen)
        stats[:, -1] = torch.rand(experts + 1, generator=gen) * 5 + 1
        stats[1, -1] = 0.0  # no probes: kept
        stats[2, 5] = float("nan")  # non-finite: kept and counted
        skips = torch.zeros(experts, dtype=torch.long)
        ref_state = [t.clone() for t in (vectors, fit, q, d, skips)]
        got_state = [t.clone() for t in (vectors, fit, q, d, skips)]
        ref = D.fit_update_reference(*ref_state[:4], stats, beta, beta_fit, ref_state[4], dtype)
        got = TL.fit_update(*got_state[:4], stats, beta, beta_fit, got_state[4], dtype)
        assert torch.equal(got[2], ref[2]) and torch.equal(got_state[4], ref_state[4])
        assert torch.equal(got[1], ref[1])  # the direction the statistics were taken with
        for g, r in zip(got_state[:4], ref_state[:4]):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[0].float(), ref[0].float(), rtol=1e-4 if dtype == torch.float32 else 1e-2,
                                   atol=1e-5 if dtype == torch.float32 else 1e-2)
        assert got[0].dtype == ref[0].dtype == dtype
        checked += 1
    bad = torch.zeros(experts + 1, 2 * hidden + 3)
    bad[-1, 0], bad[-1, -1] = float("inf"), 4.0  # a non-finite direction row: q and d kept
    state = [t.clone() for t in (vectors, fit, q, d, torch.zeros(experts, dtype=torch.long))]
    TL.fit_update(*state[:4], bad, beta, beta_fit, state[4], torch.float32)
    assert torch.equal(state[2], q) and torch.allclose(state[3], d)
print("CHECKED", checked)
""")


def test_fit_update_kernel_matches_its_reference_in_the_interpreter():
    """The ``shared-1`` fit's update kernel against ``fit_update_reference``: the same experts
    updated and skipped, the same direction handed back, the tables and the term's ``[A; B]`` to
    fp32 rounding (bf16 tables to bf16's), a non-finite direction row leaves ``q`` as it was."""
    interpret(FIT_UPDATE_CHECK, checked=6, timeout=900)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the probes' Triton kernels on a GPU")
def test_cuda_probe_ops_match_their_references():
    from megatron_default_moe.ops import probe_draw as DD
    from megatron_default_moe.ops import probes as D
    from megatron_default_moe.ops.strata import TokenLayout, probe_strata

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    w = torch.rand(16384, 128, device=dev, generator=gen)
    routed = torch.rand(16384, 128, device=dev, generator=gen) < 0.06
    w[routed] = 0
    strata = torch.tensor(probe_strata(TokenLayout(1, 1, 2, 0, 2), 4096, 4, 64), device=dev).view(-1, 4)
    for seed in (1, 2**62 + 3):
        got = DD.probe_draw(w == 0, routed, strata, 64, 4, seed, False)
        ref = DD.probe_draw_reference(w == 0, routed, strata, 64, 4, seed, False)
        for g, r in zip(got, ref):
            assert torch.equal(g, r)
        probs = torch.where(routed, torch.rand(w.shape, device=dev, generator=gen), 0.0)  # the draw and both copies
        got = DD.probe_add(probs, routed, w == 0, strata, 64, 4, seed, False)
        ref = DD.probe_add_reference(probs, routed, w == 0, strata, 64, 4, seed, False)
        for g, r in zip(got, ref):
            assert torch.equal(g, r)
    out = torch.randn(20000, 2048, device=dev, generator=gen).bfloat16()
    p = torch.rand(20000, device=dev, generator=gen) + 0.1
    p[torch.randperm(20000, device=dev, generator=gen)[:500]] = -1.0
    p_B, rows = p.topk(512, largest=False, sorted=False)
    counts = torch.full((16,), 1250, device=dev)
    got_out, ref_out = out.clone(), out.clone()
    got = D.probe_exclude(got_out, rows, p_B, counts, 16, 128, True)
    ref = D.probe_exclude_reference(ref_out, rows, p_B, counts, 16, 128, True)
    assert torch.equal(got_out, ref_out)
    got_grad, ref_grad = out.clone(), out.clone()
    D.probe_zero(got_grad, rows, p_B)
    D.probe_zero_reference(ref_grad, rows, p_B)
    assert torch.equal(got_grad, ref_grad)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    in_RH, s_B = torch.randn_like(out), torch.randn(512, device=dev, generator=gen)  # the shared-1 line
    got_out, ref_out = out.clone(), out.clone()
    got = D.probe_exclude(got_out, rows, p_B, counts, 16, 128, True, s_B, in_RH)
    ref = D.probe_exclude_reference(ref_out, rows, p_B, counts, 16, 128, True, s_B, in_RH)
    assert torch.equal(got_out, ref_out) and got.shape == ref.shape == (129, 2 * 2048 + 3)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-3)
    d_H = torch.randn(2048, device=dev, generator=gen).bfloat16()  # the probe rows' coordinates
    got = D.probe_coordinates(in_RH.bfloat16(), rows, p_B, d_H)
    ref = D.probe_coordinates_reference(in_RH.bfloat16(), rows, p_B, d_H)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the shared-1 fit's Triton kernel on a GPU")
def test_cuda_fit_update_matches_its_reference():
    from megatron_default_moe.ops import fit as D

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(1)
    experts, hidden = 128, 2048
    state = [torch.randn(experts, hidden, device=dev, generator=gen),
             torch.rand(experts, 2 * hidden + 3, device=dev, generator=gen) + 1.0,
             torch.randn(hidden, device=dev, generator=gen)]  # fmt: skip
    state.append(state[2] / state[2].norm())
    stats = torch.randn(experts + 1, 2 * hidden + 3, device=dev, generator=gen)
    stats[:, -1] = torch.rand(experts + 1, device=dev, generator=gen) * 16 + 1
    for dtype in (torch.bfloat16, torch.float32):
        got_state = [t.clone() for t in state] + [torch.zeros(experts, dtype=torch.long, device=dev)]
        ref_state = [t.clone() for t in state] + [torch.zeros(experts, dtype=torch.long, device=dev)]
        got = D.fit_update(*got_state[:4], stats, 0.9, 0.99, got_state[4], dtype)
        ref = D.fit_update_reference(*ref_state[:4], stats, 0.9, 0.99, ref_state[4], dtype)
        assert torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2])
        for g, r in zip(got_state, ref_state):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[0].float(), ref[0].float(), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the fused ops' Triton kernels on a GPU")
def test_cuda_ops_match_their_references():
    """On CUDA the ops run Triton; each must match its torch reference on the same device."""
    from megatron_default_moe.ops import fallback as fallback

    assert fused.TRITON_ON_CUDA, "Triton kernels were not registered on this CUDA machine"
    assert fallback.triton_enabled(), f"{fallback.ENV}=0 would compare the references with themselves"
    dev = torch.device("cuda")
    torch.manual_seed(0)
    counts = torch.tensor([900, 0, 3000, 411, 77], device=dev)
    rows = int(counts.sum()) + 29
    p = torch.rand(rows, device=dev) * 0.9 + 0.05
    p[::7] = 0.0
    out = torch.randn(rows, 1024, device=dev).bfloat16()
    for uniform in (True, False):
        for stride, offset in ((1, 0), (8, 3)):
            sampled = out[offset : rows - 29 : stride]
            args = (p, counts, offset, stride, 3, 16, uniform, True)
            got, ref = fused.expert_stats(sampled, *args), fused.expert_stats_reference(sampled, *args)
            scale = float(ref.abs().max())  # the reference's hi + lo: ~2^-17 per weight
            torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-5 * scale)
    stats = torch.randn(16, 1025, device=dev)
    stats[:, -1] = torch.arange(16, device=dev) % 3
    stats[5, 7] = float("nan")
    d_ref = torch.randn(16, 1024, device=dev)
    d_got = d_ref.clone()
    s_ref, s_got = (torch.zeros(16, dtype=torch.long, device=dev) for _ in range(2))
    snap_ref, up_ref = fused.ema_update_reference(d_ref, stats, 0.9, s_ref, torch.bfloat16)
    snap_got, up_got = fused.ema_update(d_got, stats, 0.9, s_got, torch.bfloat16)
    torch.testing.assert_close(d_got, d_ref, rtol=2e-7, atol=1e-7)
    assert torch.equal(up_got, up_ref) and torch.equal(s_got, s_ref)
    torch.testing.assert_close(snap_got.float(), snap_ref.float(), rtol=2**-8, atol=0)
    for score in ("softmax", "sigmoid", "sqrtsoftplus"):
        z = torch.randn(4096, 128, device=dev) * 3
        sel = torch.zeros_like(z, dtype=torch.bool).scatter_(1, z.topk(8, dim=1).indices, True)
        probs = torch.where(sel, torch.rand_like(z) + 0.1, 0.0)
        opts = (score, score != "softmax", False, 2.5, 1e-20 if score != "softmax" else 0.0)
        torch.testing.assert_close(fused.default_weights(z, probs, sel, *opts),
                                   fused.default_weights_reference(z, probs, sel, *opts), rtol=1e-5, atol=1e-7)
        g = torch.randn_like(z)
        got = fused.default_weights_backward(g, z, probs, sel, *opts)
        ref = fused.default_weights_backward_reference(g, z, probs, sel, *opts)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
        got = fused.default_weights_backward(g, z, probs, sel, *opts, 2 * g)  # plus Megatron's gradient
        ref = fused.default_weights_backward_reference(g, z, probs, sel, *opts, 2 * g)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
        g2, s_T1 = torch.randn(4096, 256, device=dev), torch.randn(4096, 1, device=dev)  # shared-1's [g_A | g_B], s
        got = fused.default_weights_backward(g2, z, probs, sel, *opts, 2 * g, s_T1)
        ref = fused.default_weights_backward_reference(g2, z, probs, sel, *opts, 2 * g, s_T1)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
        x, d = torch.randn(4096, 2048, device=dev).bfloat16(), torch.randn(2048, device=dev).bfloat16()  # s = x·d
        got = fused.default_weights_backward(g2.bfloat16(), z, probs, sel, *opts, 2 * g, None, x, d)
        ref = fused.default_weights_backward_reference(g2.bfloat16(), z, probs, sel, *opts, 2 * g, None, x, d)
        torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-5)
        got = fused.default_weights(z, probs, sel, *opts, torch.bfloat16)
        ref = fused.default_weights_reference(z, probs, sel, *opts, torch.bfloat16)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), ref.float(), rtol=2**-7, atol=1e-7)
    assert not fallback.FAILED, f"kernels fell back to their references: {fallback.FAILED}"


def test_a_failing_kernel_falls_back_to_its_reference_once_warned(monkeypatch):
    """A Triton kernel that cannot compile or launch here: the op runs its reference, one warning
    names the op and the error, the kernel is not tried again; layout errors are not hidden."""
    import warnings

    from megatron_default_moe.ops import fallback as fallback

    monkeypatch.setattr(fallback, "FAILED", {})
    monkeypatch.delenv(fallback.ENV, raising=False)
    tried = []

    def broken(*args):
        tried.append(1)
        raise RuntimeError("ptxas fatal: Value 'sm_999' is not defined for option 'gpu-name'")

    op = fallback.guarded("expert_stats", broken, fused.expert_stats_reference, (ValueError,))
    out, p = _rows([5, 9])
    args = (out, p, torch.tensor([5, 9]), 0, 1, 0, 2, True, True)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        first, second = op(*args), op(*args)
    assert len(seen) == 1 and tried == [1], [str(w.message) for w in seen]
    assert "expert_stats" in str(seen[0].message) and "sm_999" in str(seen[0].message)
    want = fused.expert_stats_reference(*args)
    assert torch.equal(first, want) and torch.equal(second, want)

    def misused(*args):
        raise ValueError("defaults_EH must be contiguous")

    with pytest.raises(ValueError, match="contiguous"):
        fallback.guarded("ema_update", misused, fused.ema_update_reference, (ValueError,))(*args)


def test_environment_variable_forces_the_reference(monkeypatch):
    from megatron_default_moe.ops import fallback as fallback

    monkeypatch.setattr(fallback, "FAILED", {})
    ran = []
    op = fallback.guarded("default_weights", lambda *a: ran.append("kernel") or "kernel", lambda *a: "reference")
    monkeypatch.setenv(fallback.ENV, "0")
    assert op(1) == "reference" and ran == []
    monkeypatch.setenv(fallback.ENV, "1")
    assert op(1) == "kernel" and ran == ["kernel"]


REGISTERED_CHECK = textwrap.dedent(
    """
    import os, warnings
    import torch
    import triton
    import triton.language as tl
    from megatron_default_moe.ops import ema as fused, fallback, launch as triton_launch
    from megatron_default_moe.ops.kernels import ema as triton_kernels
    # the ops as CUDA registers them, here on the CPU (the kernels run in the interpreter)
    assert fallback.register(fused.OPS, device="cpu")
    launched = []
    run = triton_launch.run
    triton_launch.run = lambda launches: (launched.append(len(launches)), run(launches))[1]
    counts, out, p = torch.tensor([40, 3, 70]), torch.randn(120, 48), torch.rand(120) + 0.1
    args = (out[1::2], p, counts, 1, 2, 2, 6, True, True)
    want = fused.expert_stats_reference(*args)
    torch.testing.assert_close(fused.expert_stats(*args), want, rtol=1e-5, atol=1e-5)
    assert launched == [2], launched
    os.environ[fallback.ENV] = "0"
    assert torch.equal(fused.expert_stats(*args), want) and launched == [2]
    del os.environ[fallback.ENV]

    @triton.jit
    def _stats_reduce_kernel(part_ptr, counts_ptr, stats_ptr, H, offset, stride, cols, L, chunk, first, E,
                             BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr):
        tl.store(stats_ptr + tl.arange(0, BLOCK_H), tl.load(part_ptr + tl.arange(0, BLOCK_H + 1)))  # shapes differ

    triton_kernels._stats_reduce_kernel = _stats_reduce_kernel  # a kernel that does not compile
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = [fused.expert_stats(*args) for _ in range(3)]
    assert all(torch.equal(g, want) for g in got)
    ours = [str(w.message) for w in seen if str(w.message).startswith("Default MoE")]  # not numpy's 0/0
    assert len(ours) == 1 and "kernel of expert_stats failed" in ours[0] and "power of 2" in ours[0], ours
    assert launched == [2, 2], launched  # tried once, then the reference only
    d, stats = torch.randn(6, 8), torch.randn(6, 9)
    fused.ema_update(d, stats, 0.9, torch.zeros(6, dtype=torch.long), torch.float32)  # still the kernel
    assert launched == [2, 2, 1], launched
    try:
        fused.ema_update(torch.randn(6, 16)[:, :8], stats, 0.9, torch.zeros(6, dtype=torch.long), torch.float32)
        raise AssertionError("a non-contiguous in-place buffer was accepted")
    except triton_launch.LayoutError:
        pass
    print("REGISTERED OK")
    """
)


def test_registered_ops_fall_back_per_op_in_the_interpreter():
    """The registration CUDA gets, run on the CPU under ``TRITON_INTERPRET=1``: the kernels run,
    ``DEFAULT_MOE_TRITON=0`` skips them, a kernel that fails falls back (one warning, that op only)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("DEFAULT_MOE_TRITON", None)
    proc = subprocess.run([sys.executable, "-c", REGISTERED_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "REGISTERED OK" in proc.stdout
