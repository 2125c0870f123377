"""Per-expert statistics of the expert outputs in one pass over them (pure torch, no Megatron).

The rows a rank's experts processed (``R``, grouped by expert in ``tokens_per_expert`` order) each
carry their routing prob: ``out_r = p_r · o_r``. Per local expert the EMA needs ``Σ w_r out_r``
(``uniform``: ``w = 1/p``; ``router``: ``w = 1``) and a count (``Σ [p ≠ 0]``, or ``Σ p``), over rows
with ``p ≠ 0`` (padding rows have ``p = 0``). One op, ``fused.expert_stats``, reads the rows once
in their own dtype and returns fp32 ``[E, H+1]``: no fp32 copy of ``[R, H]``, no boolean
selection, no host sync. On CUDA it is one Triton kernel (rows weighted in fp32); its torch
reference is one matmul with a ``[L+1, 2, R]`` weight matrix whose ``hi + lo`` terms in the
output's dtype give each weight to about 2^-17 (a bf16 ``1/p`` alone is off by up to 2^-9).

- ``row_stride = s``: only rows ``o, o + s, ...`` enter (a strided view: ``1/s`` of the bytes);
  the layer rotates ``o`` per update (``--moe-default-stats-stride``).
- Rows beyond ``Σ tokens_per_expert`` (HybridEP's static budget, NCCL-EP static shapes) belong to
  no expert. With host-side counts they are sliced off first; with counts on the rows' device (no
  sync) they stay in the op, which never lets them count (whatever they hold, NaN included).
- A NaN/Inf row makes its own expert's sums NaN, no other expert's, so the EMA skips that
  expert only (``functional.ema_update_``).
"""

from typing import Sequence, Tuple, Union

import torch

from megatron_default_moe.estimators.base import Estimator
from megatron_default_moe.functional import EMA_WEIGHTINGS
from megatron_default_moe.ops import ema as fused


def counts_on(tokens_per_expert: Union[torch.Tensor, Sequence[int]], device) -> Tuple[torch.Tensor, int]:
    """``(counts_L`` as a long tensor on ``device``, their sum if known on the host else ``None)``.

    Counts already on the rows' device stay there unread (on a GPU a read is a host sync); a list,
    or a tensor elsewhere (Megatron's pinned CPU ``tokens_per_expert``), is summed on the host."""
    if isinstance(tokens_per_expert, torch.Tensor):
        if tokens_per_expert.device == torch.device(device):
            return tokens_per_expert.long(), None
        total = sum(tokens_per_expert.tolist())  # a host tensor: no device op, no sync
        return tokens_per_expert.to(device=device, dtype=torch.long, non_blocking=True), total
    counts = [int(c) for c in tokens_per_expert]
    return torch.tensor(counts, dtype=torch.long).to(device, non_blocking=True), sum(counts)


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
    ``row_stride > 1`` takes the rows ``row_offset, row_offset + row_stride, ...`` only: the op
    reads a strided view, so the expert output is read ``1 / row_stride`` times.
    """
    if weighting not in EMA_WEIGHTINGS:
        raise ValueError(f"ema_weighting must be one of {EMA_WEIGHTINGS}, got {weighting!r}")
    if not 0 <= row_offset < row_stride:
        raise ValueError(f"need 0 <= row_offset < row_stride, got {row_offset}, {row_stride}")
    counts_L, total = counts_on(tokens_per_expert, out_RH.device)
    out_RH, p_R = out_RH.detach(), probs_R.detach().reshape(-1).contiguous()
    rows = out_RH.shape[0] if total is None else min(total, out_RH.shape[0])
    return fused.expert_stats(out_RH[row_offset:rows:row_stride], p_R, counts_L, row_offset, row_stride, first_expert,
                              num_experts, weighting == "uniform", count_rows)  # fmt: skip


class RoutedRowEMA(Estimator):
    """The paper's estimator: the EMA of each expert's output over the rows routed to it (every
    ``stride``-th row, the offset rotating per micro-batch)."""

    def __init__(self, weighting: str, stride: int):
        self.weighting, self.stride = weighting, int(stride)

    def take_stats(self, layer, out_RH, probs_R, tokens_per_expert, in_RH, counter: int):
        stats_EH1 = expert_output_stats_EH1(
            out_RH, probs_R, tokens_per_expert, layer.local_expert_indices[0], layer.config.num_moe_experts,
            weighting=self.weighting, count_rows=layer.counts_rows, row_stride=self.stride,
            row_offset=counter % self.stride,
        )  # fmt: skip
        return out_RH, stats_EH1
