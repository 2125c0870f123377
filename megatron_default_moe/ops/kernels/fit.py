"""Triton kernel of the ``shared-1`` fit's update (``ops.fit.fit_update``): both EMAs, the lines
as the term's table and the direction's power step in one launch. It computes exactly its
reference (same formulas, fp32 arithmetic); only summation orders may differ. Launched by
``ops/launch.py``; tested like ``ops/kernels/ema.py``.
"""

import triton
import triton.language as tl

from megatron_default_moe.ops.kernels.ema import _lerp


@triton.jit
def _fit_update_kernel(vec_ptr, fit_ptr, q_ptr, d_ptr, stats_ptr, table_ptr, dused_ptr, updated_ptr, skips_ptr,
                       H, E, one_minus_beta, one_minus_beta_fit, ridge, BLOCK_H: tl.constexpr):  # fmt: skip
    """Program ``e < E``: expert ``e``'s two EMAs (``ema_update``'s rule over its ``2H + 3``
    statistics; the fit's row the same width, its last value the moments' weight) and its line
    ``A_e``, ``B_e`` into the table; program ``E``: the power step of
    ``q`` and the new ``d`` (also the table's row ``2E``); see ``ops.fit.fit_update_reference``."""
    e = tl.program_id(0)
    W = 2 * H + 3
    if e < E:
        srow = stats_ptr + e.to(tl.int64) * W
        frow = fit_ptr + e.to(tl.int64) * W
        vrow = e.to(tl.int64) * H
        count = tl.load(srow + W - 1)
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for c0 in range(0, W - 1, BLOCK_H):
            c = c0 + tl.arange(0, BLOCK_H)
            acc += tl.load(srow + c, mask=c < W - 1, other=0.0)
        total = tl.sum(acc, axis=0) + count
        finite = (total - total) == 0.0
        ok = finite & (count > 0.0)
        cnt = tl.where(ok, count, 1.0)
        m1_old = tl.load(frow + 2 * H)
        m2_old = tl.load(frow + 2 * H + 1)
        w_old = tl.load(frow + W - 1)
        m1 = tl.where(ok, _lerp(m1_old, tl.load(srow + 2 * H) / cnt, one_minus_beta_fit), m1_old)
        m2 = tl.where(ok, _lerp(m2_old, tl.load(srow + 2 * H + 1) / cnt, one_minus_beta_fit), m2_old)
        w = tl.where(ok, _lerp(w_old, count / cnt, one_minus_beta_fit), w_old)
        tl.store(frow + 2 * H, m1)
        tl.store(frow + 2 * H + 1, m2)
        tl.store(frow + W - 1, w)
        wd = tl.maximum(w, 1e-30)  # the moments debiased, as ``line_tables``
        m1d = m1 / wd
        m2d = m2 / wd
        den = tl.maximum(m2d - m1d * m1d, 0.0) * (1.0 + ridge) + 1e-6 * m2d + 1e-30
        for h0 in range(0, H, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            m = h < H
            mean_y = tl.load(srow + h, mask=m, other=0.0) / cnt
            v_old = tl.load(vec_ptr + vrow + h, mask=m, other=0.0)
            y_old = tl.load(frow + h, mask=m, other=0.0)
            sy_old = tl.load(frow + H + h, mask=m, other=0.0)
            v = tl.where(ok, _lerp(v_old, mean_y, one_minus_beta), v_old)
            y = tl.where(ok, _lerp(y_old, mean_y, one_minus_beta_fit), y_old)
            sy = tl.where(ok, _lerp(sy_old, tl.load(srow + H + h, mask=m, other=0.0) / cnt, one_minus_beta_fit), sy_old)
            tl.store(vec_ptr + vrow + h, v, mask=m)
            tl.store(frow + h, y, mask=m)
            tl.store(frow + H + h, sy, mask=m)
            b = (sy / wd - m1d * (y / wd)) / den
            tl.store(table_ptr + vrow + h, (v - m1d * b).to(table_ptr.dtype.element_ty), mask=m)
            tl.store(table_ptr + E * H + vrow + h, b.to(table_ptr.dtype.element_ty), mask=m)
        tl.store(updated_ptr + e, ok)
        skipped = (count > 0.0) & (finite == 0)
        tl.store(skips_ptr + e, tl.load(skips_ptr + e) + skipped.to(tl.int64))
    else:
        row = stats_ptr + E * W
        n = tl.load(row + W - 1)
        nn = tl.maximum(n, 1.0)
        dot = tl.zeros([BLOCK_H], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            m = h < H
            d = tl.load(d_ptr + h, mask=m, other=0.0)
            dot += tl.load(row + H + h, mask=m, other=0.0) * d
            tl.store(dused_ptr + h, d, mask=m)
        proj = tl.sum(dot, axis=0) / nn
        bad = tl.zeros([BLOCK_H], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            m = h < H
            cd = (tl.load(row + h, mask=m, other=0.0) - tl.load(row + H + h, mask=m, other=0.0) * proj) / nn
            bad += tl.where(m & ((cd - cd) != 0.0), 1.0, 0.0)
        ok = (n > 0.0) & (tl.sum(bad, axis=0) == 0.0)
        sq = tl.zeros([BLOCK_H], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            m = h < H
            q = tl.load(q_ptr + h, mask=m, other=0.0)
            cd = (tl.load(row + h, mask=m, other=0.0) - tl.load(row + H + h, mask=m, other=0.0) * proj) / nn
            q = tl.where(ok, _lerp(q, cd, one_minus_beta_fit), q)
            tl.store(q_ptr + h, q, mask=m)
            sq += q * q
        norm = tl.maximum(tl.sqrt(tl.sum(sq, axis=0)), 1e-30)
        for h0 in range(0, H, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            m = h < H
            d = tl.load(q_ptr + h, mask=m, other=0.0) / norm
            tl.store(d_ptr + h, d, mask=m)
            tl.store(table_ptr + 2 * E * H + h, d.to(table_ptr.dtype.element_ty), mask=m)  # the table's row 2E
