"""Triton kernels of the fused ops (``fused.py``): one launch each where the reference takes ~10.

Each kernel computes exactly its reference in ``fused.py`` (same formulas, fp32 arithmetic); only
summation orders may differ. Tested against the references on CPU under ``TRITON_INTERPRET=1``
(``tests/test_fused.py``) and on CUDA by ``scripts/gpu_check.sh``.
"""

import torch
import triton
import triton.language as tl

BLOCK_ROWS = 256
BLOCK_H = 512


@triton.jit
def _row_weights(p, UNIFORM: tl.constexpr):
    """(sum weight, count weight) of a row with prob ``p`` (fp32); see ``fused.row_weights``."""
    one = tl.where(p == 0.0, 0.0, p / p)  # 1, 0 for padding, NaN kept
    if UNIFORM:
        return tl.where(p == 0.0, 0.0, 1.0 / p), one
    return one, p


@triton.jit
def _stats_weights_kernel(p_ptr, counts_ptr, m_ptr, offset, stride, cols, L, UNIFORM: tl.constexpr,
                          BLOCK: tl.constexpr):  # fmt: skip
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = j < cols
    r = offset + j.to(tl.int64) * stride
    p = tl.load(p_ptr + r, mask=valid, other=0.0).to(tl.float32)
    ids = tl.zeros([BLOCK], dtype=tl.int32)
    cum = tl.load(counts_ptr) * 0
    for e in range(0, L):  # searchsorted(cumsum(counts), r, right=True)
        cum += tl.load(counts_ptr + e)
        ids += (r >= cum).to(tl.int32)
    w, _ = _row_weights(p, UNIFORM)
    hi = w.to(m_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
    lo = (w - hi.to(tl.float32)).to(m_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
    zero = tl.zeros([BLOCK], dtype=tl.float32).to(m_ptr.dtype.element_ty)
    for e in range(0, L + 1):
        base = m_ptr + e * 2 * cols
        tl.store(base + j, tl.where(ids == e, hi, zero), mask=valid)
        tl.store(base + cols + j, tl.where(ids == e, lo, zero), mask=valid)


@triton.jit
def _stats_finish_kernel(sums_ptr, p_ptr, counts_ptr, out_ptr, H, rows, offset, stride, first, L,
                         UNIFORM: tl.constexpr, COUNT_ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK_R: tl.constexpr):  # fmt: skip
    e = tl.program_id(0)
    row = out_ptr + e.to(tl.int64) * (H + 1)
    local = e - first
    is_local = (local >= 0) & (local < L)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        m = (h < H) & is_local
        hi = tl.load(sums_ptr + local * 2 * H + h, mask=m, other=0.0)
        lo = tl.load(sums_ptr + (local * 2 + 1) * H + h, mask=m, other=0.0)
        tl.store(row + h, hi + lo, mask=h < H)
    count = 0.0
    if COUNT_ROWS:
        start = tl.load(counts_ptr) * 0
        for k in range(0, tl.where(is_local, local, 0)):
            start += tl.load(counts_ptr + k)
        end = tl.where(is_local, tl.minimum(start + tl.load(counts_ptr + local, mask=is_local, other=0), rows), 0)
        j0 = tl.maximum(start - offset + stride - 1, 0) // stride  # first sampled row >= start
        j1 = tl.maximum(end - offset + stride - 1, 0) // stride
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for jb in range(j0, j1, BLOCK_R):
            j = jb + tl.arange(0, BLOCK_R)
            p = tl.load(p_ptr + offset + j * stride, mask=j < j1, other=0.0).to(tl.float32)
            _, cw = _row_weights(p, UNIFORM)
            acc += tl.where(j < j1, cw, 0.0)
        count = tl.sum(acc, axis=0)
    tl.store(row + H, count)


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


def stats_weights(p_R, counts_L, offset, stride, cols, uniform, dtype):
    L = counts_L.numel()
    matrix = torch.empty(L + 1, 2, cols, dtype=dtype, device=p_R.device)
    if cols:
        grid = (triton.cdiv(cols, BLOCK_ROWS),)
        _stats_weights_kernel[grid](p_R, counts_L, matrix, offset, stride, cols, L, UNIFORM=uniform, BLOCK=BLOCK_ROWS)
    return matrix


def stats_finish(sums_LSH, p_R, counts_L, rows, offset, stride, first, num_experts, uniform, count_rows):
    H = sums_LSH.shape[-1]
    out = torch.empty(num_experts, H + 1, dtype=torch.float32, device=sums_LSH.device)
    _stats_finish_kernel[(num_experts,)](sums_LSH, p_R, counts_L, out, H, rows, offset, stride, first,
                                         counts_L.numel(), UNIFORM=uniform, COUNT_ROWS=count_rows,
                                         BLOCK_H=BLOCK_H, BLOCK_R=BLOCK_ROWS)  # fmt: skip
    return out


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
