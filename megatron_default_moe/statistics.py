"""Per-expert statistics of the expert outputs in one pass over them (pure torch, no Megatron).

The rows a rank's experts processed (``R``, grouped by expert in ``tokens_per_expert`` order) each
carry their routing prob: ``out_r = p_r · o_r``. Per local expert the EMA needs ``Σ w_r out_r``
(``uniform``: ``w = 1/p``; ``router``: ``w = 1``) and a count (``Σ [p ≠ 0]``, or ``Σ p``), over rows
with ``p ≠ 0`` (padding rows have ``p = 0``). Both come from one small weight matrix ``[L+1, 2, R]``
(``L`` local experts, one row for rows past the counts, ``hi``/``lo``) and one matmul with ``out_RH`` in its own dtype, accumulated and returned in
fp32: no fp32 copy of ``[R, H]``, no boolean selection, no host sync. The small steps around the
matmul are ``fused`` ops (one kernel each on CUDA).

- Precision: a bf16 copy of ``1/p`` is off by up to 2^-9; each weight is split into two terms of
  the output's dtype, ``hi + lo`` (exact to about 2^-17), as two rows of the same matmul.
- ``row_stride = s``: only rows ``o, o + s, ...`` enter (the matmul reads a strided view: ``1/s``
  of the bytes); the layer rotates ``o`` per update (``--moe-default-stats-stride``).
- Rows beyond ``Σ tokens_per_expert`` (HybridEP's static budget, NCCL-EP static shapes) belong to
  no expert and get weight 0. With host-side counts they are sliced off first; with device-side
  counts (no sync) they stay in the matmul, so their contents must be finite: a NaN there reaches
  every expert's sum and the EMA skips that update (``functional.ema_update_``).
"""

from typing import Sequence, Tuple, Union

import torch

from megatron_default_moe import fused

EMA_WEIGHTINGS = ("uniform", "router")


def counts_on(tokens_per_expert: Union[torch.Tensor, Sequence[int]], device) -> Tuple[torch.Tensor, int]:
    """``(counts_L`` as a long tensor on ``device``, their sum if known on the host else ``None)``."""
    if isinstance(tokens_per_expert, torch.Tensor):
        host = tokens_per_expert.device.type == "cpu"
        total = sum(tokens_per_expert.tolist()) if host else None  # no device op, no sync
        return tokens_per_expert.to(device=device, dtype=torch.long, non_blocking=True), total
    counts = [int(c) for c in tokens_per_expert]
    return torch.tensor(counts, dtype=torch.long).to(device, non_blocking=True), sum(counts)


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` accumulated and returned in fp32, reading ``b`` in its own dtype where the backend
    has such a kernel (CUDA: ``aten::mm.dtype``); elsewhere via fp32 copies."""
    if a.dtype == b.dtype == torch.float32:
        return a @ b
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except (NotImplementedError, RuntimeError):
        return a.float() @ b.float()


def expert_output_stats_EH1(
    out_RH: torch.Tensor,
    probs_R: torch.Tensor,
    tokens_per_expert: Union[torch.Tensor, Sequence[int]],
    first_expert: int,
    num_experts: int,
    weighting: str = "uniform",
    count_rows: bool = True,
    row_stride: int = 1,
    row_offset: int = 0,
) -> torch.Tensor:
    """Per-expert ``[sum | count]`` of this rank's expert outputs, fp32 ``[E, H+1]`` (see module).

    Local expert ``l`` is global expert ``first_expert + l``; other experts' rows stay zero, ready
    for the all-reduce over the stage. ``count_rows=False`` leaves the count column zero
    (expert-tensor-parallel ranks other than the first hold partial sums of rows counted elsewhere).
    ``row_stride > 1`` takes the rows ``row_offset, row_offset + row_stride, ...`` only: the matmul
    reads a strided view, so the expert output is read ``1 / row_stride`` times.
    """
    if weighting not in EMA_WEIGHTINGS:
        raise ValueError(f"ema_weighting must be one of {EMA_WEIGHTINGS}, got {weighting!r}")
    if not 0 <= row_offset < row_stride:
        raise ValueError(f"need 0 <= row_offset < row_stride, got {row_offset}, {row_stride}")
    counts_L, total = counts_on(tokens_per_expert, out_RH.device)
    out_RH, p_R = out_RH.detach(), probs_R.detach().reshape(-1).contiguous()
    rows = out_RH.shape[0] if total is None else min(total, out_RH.shape[0])
    cols, local = fused.sampled_rows(rows, row_offset, row_stride), counts_L.numel()
    uniform = weighting == "uniform"
    matrix_LSC = fused.stats_weights(p_R, counts_L, row_offset, row_stride, cols, uniform, out_RH.dtype)
    sampled_CH = out_RH[row_offset:rows:row_stride]
    sums_LSH = mm_fp32(matrix_LSC.view(2 * (local + 1), cols), sampled_CH).view(local + 1, 2, -1)
    return fused.stats_finish(sums_LSH, p_R, counts_L, rows, row_offset, row_stride, first_expert, num_experts,
                              uniform, count_rows)  # fmt: skip
