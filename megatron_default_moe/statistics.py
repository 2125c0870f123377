"""Per-expert statistics of the expert outputs in one pass over them (pure torch, no Megatron).

The rows a rank's experts processed (``R``, grouped by expert in ``tokens_per_expert`` order) each
carry their routing prob: ``out_r = p_r · o_r``. Per local expert the EMA needs ``Σ w_r out_r``
(``uniform``: ``w = 1/p``; ``router``: ``w = 1``) and a count (``Σ [p ≠ 0]``, or ``Σ p``), over rows
with ``p ≠ 0`` (padding rows have ``p = 0``). Both come from one small weight matrix ``[2·L, R]``
(``L`` local experts) and one matmul with ``out_RH`` in its own dtype, accumulated and returned in
fp32: no fp32 copy of ``[R, H]``, no boolean selection, no host sync.

- Precision: a bf16 copy of ``1/p`` is off by up to 2^-9; each weight is split into two terms of
  the output's dtype, ``hi + lo`` (exact to about 2^-17), as two rows of the same matmul.
- Rows beyond ``Σ tokens_per_expert`` (HybridEP's static budget, NCCL-EP static shapes) belong to
  no expert and get weight 0. With host-side counts they are sliced off first; with device-side
  counts (no sync) they stay in the matmul, so their contents must be finite: a NaN there reaches
  every expert's sum and the EMA skips that update (``functional.ema_update_``).
"""

from typing import Sequence, Tuple, Union

import torch

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
) -> torch.Tensor:
    """Per-expert ``[sum | count]`` of this rank's expert outputs, fp32 ``[E, H+1]`` (see module).

    Local expert ``l`` is global expert ``first_expert + l``; other experts' rows stay zero, ready
    for the all-reduce over the stage. ``count_rows=False`` leaves the count column zero
    (expert-tensor-parallel ranks other than the first hold partial sums of rows counted elsewhere).
    """
    if weighting not in EMA_WEIGHTINGS:
        raise ValueError(f"ema_weighting must be one of {EMA_WEIGHTINGS}, got {weighting!r}")
    device, dtype = out_RH.device, out_RH.dtype
    counts_L, total = counts_on(tokens_per_expert, device)
    out_RH, p_R = out_RH.detach(), probs_R.detach().reshape(-1)
    if total is not None:
        out_RH, p_R = out_RH[:total], p_R[:total]
    (rows, hidden), local = out_RH.shape, counts_L.numel()
    # row -> local expert; rows past the counts get id L, a row of weights that is dropped
    ids_R = torch.searchsorted(counts_L.cumsum(0), torch.arange(rows, device=device), right=True)
    p_R = p_R.float()
    # per row: [sum weight, count weight] x [hi, lo] (lo: what the output's dtype lost of hi)
    split_2SR = out_RH.new_empty(2, 2, rows)
    weights_2R = torch.empty(2, rows, device=device)
    if weighting == "uniform":
        torch.reciprocal(p_R, out=weights_2R[0]).nan_to_num_(posinf=0.0)  # 1/p; padding (p = 0): 0
        torch.sign(p_R, out=weights_2R[1])
    else:
        torch.sign(p_R, out=weights_2R[0])
        weights_2R[1].copy_(p_R)
    split_2SR[:, 0].copy_(weights_2R)
    torch.sub(weights_2R, split_2SR[:, 0], out=split_2SR[:, 1])
    # [sums | counts] x [local expert (+1 for rows past the counts)] x [hi, lo] x rows
    matrix_2LSR = out_RH.new_zeros(2, local + 1, 2, rows)
    matrix_2LSR.scatter_(1, ids_R.view(1, 1, 1, rows).expand(2, 1, 2, rows), split_2SR.unsqueeze(1))
    stats_EH1 = torch.zeros(num_experts, hidden + 1, dtype=torch.float32, device=device)
    mine_LH1 = stats_EH1[first_expert : first_expert + local]
    sums_LSH = mm_fp32(matrix_2LSR[0].reshape(2 * (local + 1), rows), out_RH).view(local + 1, 2, hidden)
    torch.sum(sums_LSH[:local], dim=1, out=mine_LH1[:, :hidden])
    if count_rows:
        torch.sum(matrix_2LSR[1, :local], dim=(1, 2), dtype=torch.float32, out=mine_LH1[:, hidden])
    return stats_EH1
