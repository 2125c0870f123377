"""Triton kernels of the fused ops (``ops/ema.py``): one or two launches where the reference takes ~10.

Each kernel computes exactly its reference in ``ops/ema.py`` (same formulas, fp32 arithmetic); only
summation orders may differ; the probes' kernels are in ``ops/kernels/probes.py``.
``ops/launch.py`` builds their launches. Tested against the references on CPU under
``TRITON_INTERPRET=1`` (``tests/test_fused.py``), compiled for sm_80 / sm_90 / sm_100 without a GPU
(``tests/test_triton_aot.py``), on CUDA by ``scripts/gpu_check.sh``.
"""

import triton
import triton.language as tl


@triton.jit
def _row_weights(p, UNIFORM: tl.constexpr):
    """(sum weight, count weight) of a row with prob ``p`` (fp32); see ``fused.row_weights``."""
    one = tl.where(p == 0.0, 0.0, p / p)  # 1, 0 for padding, NaN kept
    if UNIFORM:
        return tl.where(p == 0.0, 0.0, 1.0 / p), one
    return one, p


@triton.jit
def _segments(counts_ptr, L, offset, stride, cols, chunk, BLOCK_L: tl.constexpr):
    """Per local expert (lanes of ``BLOCK_L``), from the device-side counts: its sampled rows
    ``[j0, j1)`` of the view and its segments ``[s0, s1)`` (``chunk`` rows each, experts in order)."""
    lane = tl.arange(0, BLOCK_L)
    n = tl.load(counts_ptr + lane, mask=lane < L, other=0).to(tl.int64)
    end = tl.cumsum(n, axis=0)
    j1 = tl.minimum(tl.maximum(end - offset + stride - 1, 0) // stride, cols)  # the view's rows only
    j0 = tl.minimum(tl.maximum(end - n - offset + stride - 1, 0) // stride, j1)  # first sampled row >= start
    segs = (j1 - j0 + chunk - 1) // chunk
    s1 = tl.cumsum(segs, axis=0)
    return j0, j1, s1 - segs, s1


@triton.jit
def _stats_partial_kernel(out_ptr, ld, p_ptr, counts_ptr, part_ptr, H, offset, stride, cols, L, chunk,
                          UNIFORM: tl.constexpr, COUNT_ROWS: tl.constexpr, BLOCK_L: tl.constexpr,
                          BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):  # fmt: skip
    """Stage 1, program (segment ``s``, columns ``h``): fp32 ``[sum | count]`` of one expert's
    ``chunk`` sampled rows into partial row ``s``, no atomics. Programs past the last segment
    (the grid is a host-known bound) write nothing."""
    s, hb = tl.program_id(0), tl.program_id(1)
    j0, j1, s0, s1 = _segments(counts_ptr, L, offset, stride, cols, chunk, BLOCK_L)
    mine = (s0 <= s) & (s < s1)  # one lane, or none
    r0 = tl.sum(tl.where(mine, j0 + (s - s0) * chunk, 0), axis=0)
    r1 = tl.minimum(r0 + chunk, tl.sum(tl.where(mine, j1, 0), axis=0))
    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    count = tl.zeros([BLOCK_R], dtype=tl.float32)
    for jb in range(r0, r1, BLOCK_R):
        j = jb + tl.arange(0, BLOCK_R)
        m = j < r1
        p = tl.load(p_ptr + offset + j * stride, mask=m, other=0.0).to(tl.float32)
        w, cw = _row_weights(p, UNIFORM)
        x = tl.load(out_ptr + j[:, None] * ld + h[None, :], mask=m[:, None] & (h[None, :] < H), other=0.0)
        acc += tl.sum(x.to(tl.float32) * w[:, None], axis=0)
        if COUNT_ROWS:
            count += tl.where(m, cw, 0.0)
    used = tl.sum(mine.to(tl.int32), axis=0) > 0
    row = part_ptr + s.to(tl.int64) * (H + 1)
    tl.store(row + h, acc, mask=(h < H) & used)
    tl.store(row + H, tl.sum(count, axis=0), mask=used & (hb == 0))


@triton.jit
def _stats_reduce_kernel(part_ptr, counts_ptr, stats_ptr, H, offset, stride, cols, L, chunk, first, E,
                         BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr):  # fmt: skip
    """Stage 2, program (local expert ``l``, columns ``h`` of ``H+1``): its segments' partial rows
    summed in order (deterministic) into row ``first + l``; it also zeroes the non-local rows
    ``k = l, l + L, ...`` of the ``E - L``."""
    l, hb = tl.program_id(0), tl.program_id(1)
    _, _, s0, s1 = _segments(counts_ptr, L, offset, stride, cols, chunk, BLOCK_L)
    lane = tl.arange(0, BLOCK_L)
    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    m = h < H + 1
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for s in range(tl.sum(tl.where(lane == l, s0, 0), axis=0), tl.sum(tl.where(lane == l, s1, 0), axis=0)):
        acc += tl.load(part_ptr + s * (H + 1) + h, mask=m, other=0.0)
    tl.store(stats_ptr + (first + l).to(tl.int64) * (H + 1) + h, acc, mask=m)
    for k in range(l, E - L, L):
        e = tl.where(k < first, k, k + L)
        tl.store(stats_ptr + e.to(tl.int64) * (H + 1) + h, tl.zeros([BLOCK_H], dtype=tl.float32), mask=m)


@triton.jit
def _lerp(a, b, w):
    """``torch.lerp``'s two formulas (``w`` a scalar weight)."""
    return tl.where(w < 0.5, a + w * (b - a), b - (b - a) * (1.0 - w))


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
        new = tl.where(ok, _lerp(d, mean, one_minus_beta), d)
        tl.store(defaults_ptr + drow + h, new, mask=m)
        tl.store(snapshot_ptr + drow + h, new.to(snapshot_ptr.dtype.element_ty), mask=m)
    tl.store(updated_ptr + e, ok)
    skipped = (count > 0.0) & (finite == 0)
    tl.store(skips_ptr + e, tl.load(skips_ptr + e) + skipped.to(tl.int64))


@triton.jit
def _scores(z, m, SCORE: tl.constexpr):
    """Megatron's unbiased score ``f`` of the tokens' logits along the last axis (one row, or a
    block of rows; fp32); see ``functional.router_scores_TE``."""
    if SCORE == 0:  # softmax
        e = tl.where(m, tl.exp(z - tl.max(tl.where(m, z, float("-inf")), axis=-1, keep_dims=True)), 0.0)
        return e / tl.sum(e, axis=-1, keep_dims=True)
    if SCORE == 1:  # sigmoid
        return tl.sigmoid(z)
    x = tl.exp(z)
    u = 1.0 + x
    log1p = tl.where(u == 1.0, x, tl.log(u) * x / (u - 1.0))  # Kahan's accurate log1p(x)
    return tl.sqrt(tl.where(z > 20.0, z, log1p))  # sqrt-softplus (torch's threshold 20)


@triton.jit
def _coefficient(f, m, p_ptr, sel_ptr, idx, scale, eps, RENORM: tl.constexpr, ALL: tl.constexpr):
    """``c / N`` where the prob is 0, else 0 (``N`` detached, per row)."""
    p = tl.load(p_ptr + idx, mask=m, other=1.0)
    c = scale
    if RENORM:
        if ALL:
            n = tl.sum(tl.where(m, f, 0.0), axis=-1, keep_dims=True) + eps
        else:
            sel = tl.load(sel_ptr + idx, mask=m, other=0)
            n = tl.sum(tl.where(m & (sel != 0), f, 0.0), axis=-1, keep_dims=True) + eps
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
def _dot(a, b, acc, IEEE: tl.constexpr, WIDEN: tl.constexpr):
    """``acc + a @ b``: tensor cores in ``a``'s 16-bit dtype, IEEE fp32 for fp32 (as the reference);
    ``WIDEN`` (the Triton interpreter only, whose bf16 ``tl.dot`` is wrong) widens the tiles to
    fp32 first: the same result, products of 16-bit values being exact in fp32."""
    if WIDEN:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _weights_bwd_kernel(g_ptr, table_ptr, s_ptr, x_ptr, d_ptr, z_ptr, p_ptr, sel_ptr, base_ptr, dz_ptr, T, E, H,
                        scale, eps, SCORE: tl.constexpr, RENORM: tl.constexpr, ALL: tl.constexpr,
                        HAS_BASE: tl.constexpr, TABLE: tl.constexpr, HAS_S: tl.constexpr, X_DOT: tl.constexpr,
                        IEEE: tl.constexpr, WIDEN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                        BLOCK_K: tl.constexpr):  # fmt: skip
    """Program (``BLOCK_T`` tokens): their ``dL/dw`` ``g``, read (``[T, E]``, or ``[g_A | g_B]``
    ``[T, 2E]`` with ``HAS_S``), or with ``TABLE`` formed here from the term's ``dL/dy`` ``[T, H]``
    and its table ``[K, H]`` (``K = E``, or ``2E`` for ``[A; B]``: ``tl.dot`` over ``H``, fp32
    accumulators); ``g = g_A + s g_B`` (``s`` given, or ``x · d`` formed here with ``X_DOT``); then
    the weights' backward to the logits, plus Megatron's own (``HAS_BASE``)."""
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    mt = t < T
    e = tl.arange(0, BLOCK_E)
    m = mt[:, None] & (e < E)[None, :]
    idx = t[:, None] * E + e[None, :]
    k = tl.arange(0, BLOCK_K)
    if TABLE:
        g = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
        g_b = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            mk = k0 + k < H
            dy = tl.load(g_ptr + t[:, None] * H + (k0 + k)[None, :], mask=mt[:, None] & mk[None, :], other=0.0)
            rows = table_ptr + e[None, :].to(tl.int64) * H + (k0 + k)[:, None]  # [K, H] read as columns
            mr = mk[:, None] & (e < E)[None, :]
            g = _dot(dy, tl.load(rows, mask=mr, other=0.0), g, IEEE, WIDEN)
            if HAS_S:
                g_b = _dot(dy, tl.load(rows + E * H, mask=mr, other=0.0), g_b, IEEE, WIDEN)
    elif HAS_S:
        g = tl.load(g_ptr + t[:, None] * 2 * E + e[None, :], mask=m, other=0.0).to(tl.float32)
        g_b = tl.load(g_ptr + t[:, None] * 2 * E + E + e[None, :], mask=m, other=0.0).to(tl.float32)
    else:
        g = tl.load(g_ptr + idx, mask=m, other=0.0).to(tl.float32)
    if HAS_S:  # the shared-1 term: g = g_A + s * g_B
        if X_DOT:  # s = x_t · d from the token's input row (fp32 products and sum)
            acc = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
            for k0 in range(0, H, BLOCK_K):
                mk = k0 + k < H
                x = tl.load(x_ptr + t[:, None] * H + (k0 + k)[None, :], mask=mt[:, None] & mk[None, :], other=0.0)
                acc += x.to(tl.float32) * tl.load(d_ptr + k0 + k, mask=mk, other=0.0).to(tl.float32)[None, :]
            s = tl.sum(acc, axis=1)
        else:
            s = tl.load(s_ptr + t, mask=mt, other=0.0)
        g += s[:, None] * g_b
    z = tl.load(z_ptr + idx, mask=m, other=0.0).to(tl.float32)
    f = _scores(z, m, SCORE)
    df = g * _coefficient(f, m, p_ptr, sel_ptr, idx, scale, eps, RENORM, ALL)
    if SCORE == 0:
        dz = f * (df - tl.sum(tl.where(m, f * df, 0.0), axis=1, keep_dims=True))
    elif SCORE == 1:
        dz = df * (1.0 - f) * f
    else:
        dz = df * tl.sigmoid(z) / (2.0 * f)
    if HAS_BASE:  # Megatron's own logits gradient, added in this pass
        dz += tl.load(base_ptr + idx, mask=m, other=0.0).to(tl.float32)
    tl.store(dz_ptr + idx, dz.to(dz_ptr.dtype.element_ty), mask=m)
