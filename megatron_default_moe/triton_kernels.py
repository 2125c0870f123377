"""Triton kernels of the fused ops (``fused.py``): one launch each where the reference takes ~10.

Each kernel computes exactly its reference in ``fused.py`` (same formulas, fp32 arithmetic); only
summation orders may differ. Tested against the references on CPU under ``TRITON_INTERPRET=1``
(``tests/test_fused.py``) and on CUDA by ``scripts/gpu_check.sh``.
"""

import torch
import triton
import triton.language as tl

BLOCK_H = 512  # 1-D passes over a row of H
STATS_BLOCK_R, STATS_BLOCK_H = 32, 128  # expert_stats: a [rows, H] tile per step


@triton.jit
def _row_weights(p, UNIFORM: tl.constexpr):
    """(sum weight, count weight) of a row with prob ``p`` (fp32); see ``fused.row_weights``."""
    one = tl.where(p == 0.0, 0.0, p / p)  # 1, 0 for padding, NaN kept
    if UNIFORM:
        return tl.where(p == 0.0, 0.0, 1.0 / p), one
    return one, p


@triton.jit
def _expert_stats_kernel(out_ptr, ld, cols, p_ptr, counts_ptr, stats_ptr, H, offset, stride, first, L,
                         UNIFORM: tl.constexpr, COUNT_ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK_R: tl.constexpr):  # fmt: skip
    """Program (expert ``e``, columns ``h``): its sampled rows' weighted sum, read once, in fp32."""
    e, hb = tl.program_id(0), tl.program_id(1)
    local = e - first
    is_local = (local >= 0) & (local < L)
    start = tl.load(counts_ptr) * 0
    for k in range(0, tl.where(is_local, local, 0)):
        start += tl.load(counts_ptr + k)
    end = tl.where(is_local, start + tl.load(counts_ptr + local, mask=is_local, other=0), 0)
    j0 = tl.maximum(start - offset + stride - 1, 0) // stride  # first sampled row >= start
    j1 = tl.minimum(tl.maximum(end - offset + stride - 1, 0) // stride, cols)  # the view's rows only
    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    count = tl.zeros([BLOCK_R], dtype=tl.float32)
    for jb in range(j0, j1, BLOCK_R):
        j = jb + tl.arange(0, BLOCK_R)
        m = j < j1
        p = tl.load(p_ptr + offset + j.to(tl.int64) * stride, mask=m, other=0.0).to(tl.float32)
        w, cw = _row_weights(p, UNIFORM)
        x = tl.load(out_ptr + j.to(tl.int64)[:, None] * ld + h[None, :], mask=m[:, None] & (h[None, :] < H),
                    other=0.0).to(tl.float32)  # fmt: skip
        acc += tl.sum(x * w[:, None], axis=0)
        if COUNT_ROWS:
            count += tl.where(m, cw, 0.0)
    row = stats_ptr + e.to(tl.int64) * (H + 1)
    tl.store(row + h, acc, mask=h < H)
    if hb == 0:
        tl.store(row + H, tl.sum(count, axis=0))


@triton.jit
def _ema_kernel(defaults_ptr, stats_ptr, snapshot_ptr, updated_ptr, skips_ptr, H, one_minus_beta,
                BLOCK_H: tl.constexpr):  # fmt: skip
    e = tl.program_id(0)
    srow = stats_ptr + e.to(tl.int64) * (H + 1)
    drow = e.to(tl.int64) * H
    count = tl.load(srow + H)
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        acc += tl.load(srow + h, mask=h < H, other=0.0)
    total = tl.sum(acc, axis=0) + count
    finite = (total - total) == 0.0
    ok = finite & (count > 0.0)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        m = h < H
        d = tl.load(defaults_ptr + drow + h, mask=m, other=0.0)
        mean = tl.load(srow + h, mask=m, other=0.0) / tl.where(ok, count, 1.0)
        if one_minus_beta < 0.5:  # torch.lerp's two formulas
            new = d + one_minus_beta * (mean - d)
        else:
            new = mean - (mean - d) * (1.0 - one_minus_beta)
        new = tl.where(ok, new, d)
        tl.store(defaults_ptr + drow + h, new, mask=m)
        tl.store(snapshot_ptr + drow + h, new.to(snapshot_ptr.dtype.element_ty), mask=m)
    tl.store(updated_ptr + e, ok)
    skipped = (count > 0.0) & (finite == 0)
    tl.store(skips_ptr + e, tl.load(skips_ptr + e) + skipped.to(tl.int64))


def expert_stats(out_CH, p_R, counts_L, offset, stride, first, num_experts, uniform, count_rows):
    H = out_CH.shape[1]
    if out_CH.stride(1) != 1:
        out_CH = out_CH.contiguous()
    stats = torch.empty(num_experts, H + 1, dtype=torch.float32, device=out_CH.device)
    grid = (num_experts, triton.cdiv(H, STATS_BLOCK_H))
    _expert_stats_kernel[grid](out_CH, out_CH.stride(0), out_CH.shape[0], p_R, counts_L, stats, H, offset, stride, first,
                               counts_L.numel(), UNIFORM=uniform, COUNT_ROWS=count_rows,
                               BLOCK_H=STATS_BLOCK_H, BLOCK_R=STATS_BLOCK_R)  # fmt: skip
    return stats


def ema_update_(defaults_EH, stats_EH1, beta, skips_E, snapshot_dtype):
    E, H = defaults_EH.shape
    snapshot = torch.empty(E, H, dtype=snapshot_dtype, device=defaults_EH.device)
    updated = torch.empty(E, dtype=torch.bool, device=defaults_EH.device)
    _ema_kernel[(E,)](defaults_EH, stats_EH1, snapshot, updated, skips_E, H, 1.0 - beta, BLOCK_H=BLOCK_H)
    return snapshot, updated


@triton.jit
def _scores(z, m, SCORE: tl.constexpr):
    """Megatron's unbiased score ``f`` of one token's logits (fp32); see ``functional.router_scores_TE``."""
    if SCORE == 0:  # softmax
        e = tl.where(m, tl.exp(z - tl.max(tl.where(m, z, float("-inf")), axis=0)), 0.0)
        return e / tl.sum(e, axis=0)
    if SCORE == 1:  # sigmoid
        return tl.sigmoid(z)
    x = tl.exp(z)
    u = 1.0 + x
    log1p = tl.where(u == 1.0, x, tl.log(u) * x / (u - 1.0))  # Kahan's accurate log1p(x)
    return tl.sqrt(tl.where(z > 20.0, z, log1p))  # sqrt-softplus (torch's threshold 20)


@triton.jit
def _coefficient(f, m, p_ptr, sel_ptr, idx, scale, eps, RENORM: tl.constexpr, ALL: tl.constexpr):
    """``c / N`` where the prob is 0, else 0 (``N`` detached)."""
    p = tl.load(p_ptr + idx, mask=m, other=1.0)
    c = scale
    if RENORM:
        if ALL:
            n = tl.sum(tl.where(m, f, 0.0), axis=0) + eps
        else:
            sel = tl.load(sel_ptr + idx, mask=m, other=0)
            n = tl.sum(tl.where(m & (sel != 0), f, 0.0), axis=0) + eps
        c = scale / n
    return tl.where(p != 0.0, 0.0, c)


@triton.jit
def _weights_fwd_kernel(z_ptr, p_ptr, sel_ptr, w_ptr, E, scale, eps, SCORE: tl.constexpr, RENORM: tl.constexpr,
                        ALL: tl.constexpr, BLOCK_E: tl.constexpr):  # fmt: skip
    offs = tl.arange(0, BLOCK_E)
    m = offs < E
    idx = tl.program_id(0).to(tl.int64) * E + offs
    z = tl.load(z_ptr + idx, mask=m, other=0.0).to(tl.float32)
    f = _scores(z, m, SCORE)
    w = f * _coefficient(f, m, p_ptr, sel_ptr, idx, scale, eps, RENORM, ALL)
    tl.store(w_ptr + idx, w.to(w_ptr.dtype.element_ty), mask=m)


@triton.jit
def _weights_bwd_kernel(g_ptr, z_ptr, p_ptr, sel_ptr, base_ptr, dz_ptr, E, scale, eps, SCORE: tl.constexpr,
                        RENORM: tl.constexpr, ALL: tl.constexpr, HAS_BASE: tl.constexpr,
                        BLOCK_E: tl.constexpr):  # fmt: skip
    offs = tl.arange(0, BLOCK_E)
    m = offs < E
    idx = tl.program_id(0).to(tl.int64) * E + offs
    z = tl.load(z_ptr + idx, mask=m, other=0.0).to(tl.float32)
    f = _scores(z, m, SCORE)
    df = tl.load(g_ptr + idx, mask=m, other=0.0) * _coefficient(f, m, p_ptr, sel_ptr, idx, scale, eps, RENORM, ALL)
    if SCORE == 0:
        dz = f * (df - tl.sum(tl.where(m, f * df, 0.0), axis=0))
    elif SCORE == 1:
        dz = df * (1.0 - f) * f
    else:
        dz = df * tl.sigmoid(z) / (2.0 * f)
    if HAS_BASE:  # Megatron's own logits gradient, added in this pass
        dz += tl.load(base_ptr + idx, mask=m, other=0.0).to(tl.float32)
    tl.store(dz_ptr + idx, dz.to(dz_ptr.dtype.element_ty), mask=m)


SCORES = {"softmax": 0, "sigmoid": 1, "sqrtsoftplus": 2}


def default_weights(logits_TE, probs_TE, selected_TE, score_function, renormalise, all_experts, scale, eps,
                    dtype=None):  # fmt: skip
    T, E = logits_TE.shape
    w = torch.empty(T, E, dtype=dtype or torch.float32, device=logits_TE.device)
    if T:
        _weights_fwd_kernel[(T,)](logits_TE.contiguous(), probs_TE.contiguous(), selected_TE.contiguous(), w, E,
                                  scale, eps, SCORE=SCORES[score_function], RENORM=renormalise, ALL=all_experts,
                                  BLOCK_E=triton.next_power_of_2(E))  # fmt: skip
    return w


def default_weights_backward(grad_TE, logits_TE, probs_TE, selected_TE, score_function, renormalise, all_experts,
                             scale, eps, base_TE=None):  # fmt: skip
    T, E = logits_TE.shape
    dz = torch.empty(T, E, dtype=logits_TE.dtype, device=logits_TE.device)
    base = dz if base_TE is None else base_TE.contiguous()
    if T:
        _weights_bwd_kernel[(T,)](grad_TE.contiguous(), logits_TE.contiguous(), probs_TE.contiguous(),
                                  selected_TE.contiguous(), base, dz, E, scale, eps, SCORE=SCORES[score_function],
                                  RENORM=renormalise, ALL=all_experts, HAS_BASE=base_TE is not None,
                                  BLOCK_E=triton.next_power_of_2(E))  # fmt: skip
    return dz
