"""Triton kernels of the probes' ops (``ops/probe_draw.py``, ``ops/probes.py``): the draw, the exclusion of the probe rows
with their statistics, and the zeroing of those rows' gradient. Each computes exactly its
reference (same formulas, fp32 arithmetic); only summation orders may differ. Launched by
``ops/launch.py``; tested like ``ops/kernels/ema.py``.
"""

import triton
import triton.language as tl


@triton.jit
def _fmix32(h):
    """MurmurHash3's finaliser on uint32 lanes (wrapping products); ``ops.probe_draw._fmix32``."""
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def _hashed_keys(x, seed_lo, seed_hi):
    """``ops.probe_draw.hashed_keys`` of non-negative int64 lanes: uint32."""
    h = _fmix32((x & 0xFFFFFFFF).to(tl.uint32) ^ seed_lo)
    return _fmix32(h ^ (x >> 32).to(tl.uint32) ^ seed_hi)


@triton.jit
def _draw(j, mj, w_ptr, routed_ptr, strata_ptr, E, m, stride, seed_lo, seed_hi, WEIGHTED: tl.constexpr,
          BLOCK_E: tl.constexpr):  # fmt: skip
    """Strata ``j`` (lanes, ``mj`` valid), one token row of ``E`` each: ``(token, expert, prob)``
    of each stratum's pair; see ``ops.probe_draw.probe_draw_reference``."""
    sid = tl.load(strata_ptr + 4 * j, mask=mj, other=0)
    base = tl.load(strata_ptr + 4 * j + 1, mask=mj, other=0)
    lo = tl.load(strata_ptr + 4 * j + 2, mask=mj, other=0)
    hi = tl.load(strata_ptr + 4 * j + 3, mask=mj, other=1)
    off = (_hashed_keys(2 * sid, seed_lo, seed_hi).to(tl.int64) * m) >> 32
    mine = (off >= lo) & (off < hi)
    t = base + tl.minimum(tl.maximum(off, lo), hi - 1) * stride
    e = tl.arange(0, BLOCK_E)
    me = e < E
    msk = mj[:, None] & me[None, :]
    idx = t[:, None] * E + e[None, :]
    routed = tl.load(routed_ptr + idx, mask=msk, other=1) != 0
    if WEIGHTED:
        w = tl.where(routed, 0.0, tl.load(w_ptr + idx, mask=msk, other=0.0).to(tl.float32))
        mass = w
    else:  # w_ptr: the blocked pairs (bool)
        mass = tl.where(routed | (tl.load(w_ptr + idx, mask=msk, other=1) != 0), 0.0, 1.0)
    cdf = tl.cumsum(mass, axis=1)
    total = tl.max(cdf, axis=1)  # the last column: shares are >= 0
    h = _hashed_keys(2 * sid + 1, seed_lo, seed_hi)
    key = ((h.to(tl.float64) + 0.5) * (2.0**-32)).to(tl.float32)
    target = key * total
    picked = tl.sum(tl.where(me[None, :] & (cdf <= target[:, None]), 1, 0), axis=1).to(tl.int64)
    last = tl.max(tl.where(mass > 0.0, e[None, :], -1), axis=1).to(tl.int64)
    eligible = (total > 0.0) & mine
    first_free = tl.min(tl.where(msk & ~routed, e[None, :], BLOCK_E), axis=1)
    fallback = tl.where(first_free < BLOCK_E, first_free, 0).to(tl.int64)
    expert = tl.where(eligible, tl.minimum(picked, last), fallback)
    if WEIGHTED:
        weight = tl.sum(w, axis=1)
    else:
        weight = tl.full(j.shape, 1.0, tl.float32)
    return t, expert, tl.where(eligible, -weight, 0.0)


@triton.jit
def _seed(k0, k1, k2, k3):
    """The 63-bit seed from its four 16-bit pieces (low first) as two uint32 halves."""
    return (k1.to(tl.uint32) << 16) | k0.to(tl.uint32), (k3.to(tl.uint32) << 16) | k2.to(tl.uint32)


@triton.jit(do_not_specialize=["m", "stride", "k0", "k1", "k2", "k3"])
def _probe_draw_kernel(w_ptr, routed_ptr, strata_ptr, tokens_ptr, experts_ptr, probs_ptr, E, B, m, stride, k0, k1,
                       k2, k3, WEIGHTED: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr):  # fmt: skip
    """``BLOCK_B`` strata per program (``_draw``). The seed comes as four 16-bit pieces ``k0..k3``
    (low first) and the per-call integers are not specialised: every seed and stratum size runs
    the same compiled kernel."""
    j = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    mj = j < B
    seed_lo, seed_hi = _seed(k0, k1, k2, k3)
    t, expert, prob = _draw(j, mj, w_ptr, routed_ptr, strata_ptr, E, m, stride, seed_lo, seed_hi, WEIGHTED, BLOCK_E)
    tl.store(tokens_ptr + j, t, mask=mj)
    tl.store(experts_ptr + j, expert, mask=mj)
    tl.store(probs_ptr + j, prob, mask=mj)


@triton.jit(do_not_specialize=["m", "stride", "k0", "k1", "k2", "k3"])
def _probe_add_kernel(probs_ptr, routed_ptr, w_ptr, strata_ptr, probs_out, routed_out, tokens_ptr, experts_ptr,
                      pb_ptr, E, m, stride, k0, k1, k2, k3, WEIGHTED: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_E: tl.constexpr):  # fmt: skip
    """Program (stratum ``j``, its positions ``BLOCK_M`` at a time): the stratum's pair drawn
    (``_draw``, on two identical lanes), its token rows of the probs and routing map copied with
    that pair set; see ``ops.probe_draw.probe_add_reference``. Every token row is one stratum's
    (``ops/strata.py``), so the copies are whole."""
    j = tl.program_id(0)
    lanes = j + tl.zeros([2], dtype=tl.int32)
    seed_lo, seed_hi = _seed(k0, k1, k2, k3)
    t2, e2, p2 = _draw(lanes, lanes >= 0, w_ptr, routed_ptr, strata_ptr, E, m, stride, seed_lo, seed_hi, WEIGHTED,
                       BLOCK_E)  # fmt: skip
    first = tl.program_id(1) == 0
    lane0 = tl.arange(0, 2) == 0
    tl.store(tokens_ptr + lanes, t2, mask=lane0 & first)
    tl.store(experts_ptr + lanes, e2, mask=lane0 & first)
    tl.store(pb_ptr + lanes, p2, mask=lane0 & first)
    t, ex, p = tl.max(t2, axis=0), tl.max(e2, axis=0), tl.max(p2, axis=0)
    base = tl.load(strata_ptr + 4 * j + 1)
    lo = tl.load(strata_ptr + 4 * j + 2)
    hi = tl.load(strata_ptr + 4 * j + 3)
    off = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = base + off.to(tl.int64) * stride
    e = tl.arange(0, BLOCK_E)
    msk = ((off >= lo) & (off < hi))[:, None] & (e < E)[None, :]
    idx = rows[:, None] * E + e[None, :]
    hit = (rows[:, None] == t) & (e[None, :] == ex)
    probs = tl.load(probs_ptr + idx, mask=msk, other=0.0)
    tl.store(probs_out + idx, tl.where(hit, p.to(probs.dtype, fp_downcast_rounding="rtne"), probs), mask=msk)
    routed = tl.load(routed_ptr + idx, mask=msk, other=0)
    tl.store(routed_out + idx, tl.where(hit, 1, routed).to(routed.dtype), mask=msk)


@triton.jit
def _probe_coordinates_kernel(in_ptr, ld, rows_ptr, p_ptr, d_ptr, s_ptr, H, B, BLOCK_B: tl.constexpr,
                              BLOCK_H: tl.constexpr):  # fmt: skip
    """Program (candidate rows ``b``): each probe row's ``x · d`` in fp32 over ``H`` (only the probe
    rows are read), 0 for the others; see ``ops.probes.probe_coordinates_reference``."""
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    mb = b < B
    row = tl.load(rows_ptr + b, mask=mb, other=0).to(tl.int64)
    probe = (tl.load(p_ptr + b, mask=mb, other=0.0).to(tl.float32) < 0.0) & mb
    k = tl.arange(0, BLOCK_H)
    acc = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):
        mk = k0 + k < H
        x = tl.load(in_ptr + row[:, None] * ld + (k0 + k)[None, :], mask=probe[:, None] & mk[None, :], other=0.0)
        acc += x.to(tl.float32) * tl.load(d_ptr + k0 + k, mask=mk, other=0.0).to(tl.float32)[None, :]
    tl.store(s_ptr + b, tl.sum(acc, axis=1), mask=mb)


@triton.jit
def _probe_exclude_kernel(out_ptr, ld, rows_ptr, p_ptr, counts_ptr, stats_ptr, s_ptr, in_ptr, ld_in, H, B, L, first,
                          E, W, COUNT_ROWS: tl.constexpr, LINE: tl.constexpr, BLOCK_B: tl.constexpr,
                          BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr):  # fmt: skip
    """Program (columns ``h``): over the candidate rows in order, each probe row's ``-out`` summed
    into its local expert (a one-hot ``[L, B] @ [B, h]`` product, fp32, non-finite values kept
    out of the product and re-applied to their own expert only), then the row's columns zeroed;
    with ``LINE`` also ``-out·s`` and the ``s`` counts (stats row width ``W = 2H + 3``), and in row
    ``E`` the probe tokens' input sums ``Σ x·s``, ``Σ x`` and their number; see
    ``ops.probes.probe_exclude_reference``."""
    hb = tl.program_id(0)
    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    mh = h < H
    lane = tl.arange(0, BLOCK_L)
    ml = lane < L
    ends = tl.cumsum(tl.load(counts_ptr + lane, mask=ml, other=0).to(tl.int64), axis=0)
    acc = tl.zeros([BLOCK_L, BLOCK_H], dtype=tl.float32)
    bad = tl.zeros([BLOCK_L, BLOCK_H], dtype=tl.float32)  # NaN/Inf seen per (expert, column)
    acc_s = tl.zeros([BLOCK_L, BLOCK_H], dtype=tl.float32)  # LINE: Σ -out·s
    bad_s = tl.zeros([BLOCK_L, BLOCK_H], dtype=tl.float32)
    cnt = tl.zeros([BLOCK_L], dtype=tl.float32)
    cnt_s = tl.zeros([BLOCK_L], dtype=tl.float32)
    cnt_s2 = tl.zeros([BLOCK_L], dtype=tl.float32)
    in_xs = tl.zeros([BLOCK_H], dtype=tl.float32)  # LINE and COUNT_ROWS: row E
    in_x = tl.zeros([BLOCK_H], dtype=tl.float32)
    n_in = tl.zeros([BLOCK_B], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        mb = b < B
        row = tl.load(rows_ptr + b, mask=mb, other=0).to(tl.int64)
        p = tl.load(p_ptr + b, mask=mb, other=0.0).to(tl.float32)
        probe = (p < 0.0) & mb
        ids = tl.sum(tl.where(ml[None, :] & (ends[None, :] <= row[:, None]), 1, 0), axis=1)
        keep = probe & (ids < L)
        ptrs = out_ptr + row[:, None] * ld + h[None, :]
        x = -tl.load(ptrs, mask=keep[:, None] & mh[None, :], other=0.0).to(tl.float32)
        finite = (x - x) == 0.0
        onehot = tl.where((lane[:, None] == ids[None, :]) & keep[None, :], 1.0, 0.0)  # [L, B]
        acc += tl.dot(onehot, tl.where(finite, x, 0.0), input_precision="ieee")
        bad += tl.dot(onehot, tl.where(finite, 0.0, 1.0), input_precision="ieee")
        w = tl.where(keep, -p, 0.0)
        if COUNT_ROWS:
            cnt += tl.sum(onehot * w[None, :], axis=1)
        if LINE:
            s = tl.where(keep, tl.load(s_ptr + b, mask=mb, other=0.0).to(tl.float32), 0.0)
            xs = tl.where(keep[:, None], x * s[:, None], 0.0)
            finite_s = (xs - xs) == 0.0
            acc_s += tl.dot(onehot, tl.where(finite_s, xs, 0.0), input_precision="ieee")
            bad_s += tl.dot(onehot, tl.where(finite_s, 0.0, 1.0), input_precision="ieee")
            if COUNT_ROWS:
                ws = tl.where(keep, w * s, 0.0)
                cnt_s += tl.sum(onehot * ws[None, :], axis=1)
                cnt_s2 += tl.sum(onehot * tl.where(keep, ws * s, 0.0)[None, :], axis=1)
                xin = tl.load(in_ptr + row[:, None] * ld_in + h[None, :], mask=keep[:, None] & mh[None, :],
                              other=0.0).to(tl.float32)  # fmt: skip
                in_xs += tl.sum(xin * s[:, None], axis=0)
                in_x += tl.sum(xin, axis=0)
                n_in += tl.where(keep, 1.0, 0.0)
        tl.store(ptrs, tl.zeros([BLOCK_B, BLOCK_H], dtype=out_ptr.dtype.element_ty), mask=probe[:, None] & mh[None, :])
    dest = stats_ptr + (first + lane).to(tl.int64)[:, None] * W
    mlh = ml[:, None] & mh[None, :]
    tl.store(dest + h[None, :], tl.where(bad > 0.0, float("nan"), acc), mask=mlh)
    row0 = stats_ptr + (first + lane).to(tl.int64) * W
    if LINE:
        tl.store(dest + H + h[None, :], tl.where(bad_s > 0.0, float("nan"), acc_s), mask=mlh)
        if COUNT_ROWS:
            tl.store(row0 + 2 * H, cnt_s, mask=ml & (hb == 0))
            tl.store(row0 + 2 * H + 1, cnt_s2, mask=ml & (hb == 0))
            tail = stats_ptr + E * W
            tl.store(tail + h, in_xs, mask=mh)
            tl.store(tail + H + h, in_x, mask=mh)
            tl.store(tail + W - 1, tl.sum(n_in, axis=0), mask=hb == 0)
    if COUNT_ROWS:
        tl.store(row0 + W - 1, cnt, mask=ml & (hb == 0))


@triton.jit
def _probe_zero_kernel(x_ptr, ld, rows_ptr, p_ptr, H, B, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """Program (rows ``b``, columns ``h``): the probe rows (``p < 0``) among the candidates zeroed;
    see ``ops.probes.probe_zero_reference``."""
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mb = b < B
    row = tl.load(rows_ptr + b, mask=mb, other=0).to(tl.int64)
    probe = (tl.load(p_ptr + b, mask=mb, other=0.0).to(tl.float32) < 0.0) & mb
    ptrs = x_ptr + row[:, None] * ld + h[None, :]
    tl.store(ptrs, tl.zeros([BLOCK_B, BLOCK_H], dtype=x_ptr.dtype.element_ty), mask=probe[:, None] & (h < H)[None, :])
