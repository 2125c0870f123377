"""The statistics op (``estimators/routed_rows.py``): bf16 precision against fp64, padding rows, rows
past ``tokens_per_expert`` (HybridEP / NCCL-EP static budgets), device-side counts without a host
sync, and rows grouped by Megatron's own pure-torch ``permute`` (the flex dispatcher's layout)."""

import pytest
import torch
from helpers import OpNames

from megatron_default_moe.ops import ema as fused
from megatron_default_moe.estimators import routed_rows as S

SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "item", "is_nonzero", "equal"}


def reference_EH1(out_RH, probs_R, counts, first, num_experts, weighting):
    """Row by row in fp64, from the very same (rounded) rows."""
    hidden = out_RH.shape[1]
    ref = torch.zeros(num_experts, hidden + 1, dtype=torch.float64)
    row = 0
    for local, count in enumerate(counts):
        for r in range(row, row + count):
            p = float(probs_R[r])
            if p != 0:
                w = 1.0 / p if weighting == "uniform" else 1.0
                ref[first + local, :hidden] += w * out_RH[r].double()
                ref[first + local, hidden] += 1.0 if weighting == "uniform" else p
        row += count
    return ref


def problem(counts, extra_rows=0, hidden=32, seed=0, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    rows = sum(counts) + extra_rows
    o_RH = torch.randn(rows, hidden, generator=gen) + 0.5
    p_R = torch.rand(rows, generator=gen) * 0.999 + 1e-3  # small probs: 1/p up to 1000
    p_R[::7] = 0.0  # padding rows
    return (o_RH * p_R[:, None]).to(dtype), p_R


def relative_error(stats, ref):
    return float((stats.double() - ref).norm(dim=-1).max() / ref.norm(dim=-1).max())


@pytest.mark.parametrize("weighting", ["uniform", "router"])
def test_bf16_statistics_within_1e3_of_fp64(weighting):
    counts = [300, 5, 0, 120]
    out, p = problem(counts)
    stats = S.expert_output_stats_EH1(out, p, counts, 2, 8, weighting)
    ref = reference_EH1(out, p, counts, 2, 8, weighting)
    assert stats.dtype == torch.float32
    for e in range(8):  # per expert, not only overall
        if ref[e].norm() > 0:
            err = float((stats[e].double() - ref[e]).norm() / ref[e].norm())
            assert err < 1e-3, (e, err)
        else:
            assert not stats[e].any()


def test_hi_lo_split_is_what_keeps_the_precision():
    """A bf16 copy of 1/p alone is off by up to 2^-9: the test above would catch its removal."""
    counts = [300, 5, 120]
    out, p = problem(counts)
    ref = reference_EH1(out, p, counts, 0, 3, "uniform")
    hi = (1 / p).nan_to_num(posinf=0).bfloat16().float()
    ids = torch.repeat_interleave(torch.arange(3), torch.tensor(counts))
    coarse = torch.zeros(3, out.shape[1], dtype=torch.float64).index_add_(0, ids, (hi[:, None] * out.float()).double())
    assert relative_error(S.expert_output_stats_EH1(out, p, counts, 0, 3)[:, :-1], ref[:, :-1]) < 1e-4
    assert relative_error(coarse, ref[:, :-1]) > 2 * relative_error(S.expert_output_stats_EH1(out, p, counts, 0, 3)[:, :-1], ref[:, :-1])


@pytest.mark.parametrize("counts_as", ["list", "tensor on the rows' device"])
def test_rows_past_the_counts_are_ignored(counts_as):
    """HybridEP's static budget / NCCL-EP static shapes: R > Σ tokens_per_expert. A list is summed
    on the host and the rows sliced; counts on the rows' device are not read: the op gets every
    row and must weigh those past the counts 0."""
    counts = [40, 0, 25]
    out, p = problem(counts, extra_rows=30)
    out[-30:-15] = 7.0  # garbage past the counts, NaN and Inf included: none of it may count
    out[-15:-5] = float("nan")
    out[-5:] = float("inf")
    p[-30:] = 0.5
    want = S.expert_output_stats_EH1(out[:65], p[:65], counts, 1, 4)
    given = counts if counts_as == "list" else torch.tensor(counts, device=out.device)
    with _Ops() as ops:
        got = S.expert_output_stats_EH1(out, p, given, 1, 4)
    assert ops.rows == (65 if counts_as == "list" else 95)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_counts_elsewhere_are_summed_on_the_host_counts_on_the_device_never():
    host = torch.tensor([3, 4])
    counts, total = S.counts_on(host, "meta")  # rows on another device: Megatron's pinned CPU counts
    assert counts.device.type == "meta" and counts.dtype == torch.long and total == 7
    counts, total = S.counts_on(host.int(), "cpu")  # rows on the counts' device: not read
    assert total is None and counts.dtype == torch.long and counts.tolist() == [3, 4]
    assert S.counts_on([3, 4], "cpu")[1] == 7


def test_a_nonfinite_row_poisons_its_own_expert_only():
    """A NaN/Inf row (a loss spike in one expert) makes that expert's sums non-finite, so the EMA
    skips it; the other experts' statistics stay exact (a weight 0 times NaN must not reach them)."""
    counts = [40, 10, 25]
    out, p = problem(counts)
    clean = S.expert_output_stats_EH1(out, p, counts, 0, 3)
    out[45, 3] = float("nan")  # expert 1
    out[60, :] = float("inf")  # expert 2
    got = S.expert_output_stats_EH1(out, p, counts, 0, 3)
    assert torch.equal(got[0], clean[0])
    assert not torch.isfinite(got[1, :-1]).all() and not torch.isfinite(got[2, :-1]).all()
    assert torch.equal(got[:, -1], clean[:, -1])  # counts stay finite


class _Ops(OpNames):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        if func.overloadpacket.__name__ == "expert_stats":
            self.rows = args[0].shape[0]  # the rows the op was handed
        if func.overloadpacket.__name__ == "_to_copy" and args[0].dim() > 1:
            self.names.append("_to_copy of rows")
        if func is torch.ops.aten.mm.dtype:  # CUDA's kernel, stood in for on CPU
            return torch.mm(args[0].float(), args[1].float())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("weighting", ["uniform", "router"])
def test_device_counts_need_no_host_sync_and_no_fp32_copy_of_the_rows(weighting):
    """Counts on the rows' device, as a dispatcher with device-side ``tokens_per_expert`` gives them."""
    counts = [40, 10, 25]
    out, p = problem(counts, extra_rows=5)
    with _Ops() as ops:
        stats = S.expert_output_stats_EH1(out, p, torch.tensor(counts, device=out.device), 0, 3, weighting)
    assert ops.rows == 80  # not sliced: the counts were not read on the host
    assert not SYNC_OPS & set(ops.names), ops.names
    assert ops.names.count("expert_stats") == 1 and "index" not in ops.names  # one op, no boolean selection
    with _Ops() as inner:  # the op's torch reference: one matmul reads the rows in their dtype
        fused.expert_stats_reference(out, p, torch.tensor(counts), 0, 1, 0, 3, weighting == "uniform", True)
    assert not SYNC_OPS & set(inner.names), inner.names
    assert inner.names.count("mm") == 1 and "index" not in inner.names and "_to_copy of rows" not in inner.names
    assert relative_error(stats, reference_EH1(out, p, counts, 0, 3, weighting)) < 1e-3


def test_rows_grouped_by_megatrons_permute():
    """Rows laid out by Megatron's pure-torch ``permute`` (what the dispatchers, flex included,
    hand the experts), padded to a static budget: statistics equal the token-by-token ones."""
    from megatron.core.transformer.moe.moe_utils import permute

    gen = torch.Generator().manual_seed(1)
    tokens, experts, topk, hidden = 24, 6, 2, 16
    x = torch.randn(tokens, hidden, generator=gen)
    probs = torch.softmax(torch.randn(tokens, experts, generator=gen), -1)
    top = probs.topk(topk, -1).indices
    routing_map = torch.zeros(tokens, experts, dtype=torch.bool).scatter(1, top, True)
    probs = probs * routing_map
    W = torch.randn(experts, hidden, hidden, generator=gen)
    rows, permuted_probs, *_ = permute(x, routing_map, probs=probs, num_out_tokens=tokens * topk)
    counts = routing_map.sum(0)
    ids = torch.repeat_interleave(torch.arange(experts), counts)
    out = torch.einsum("rh,rhk->rk", rows, W[ids]) * permuted_probs[:, None]
    budget = 8  # static budget: rows past the counts
    out = torch.cat([out, torch.ones(budget, hidden)])
    permuted_probs = torch.cat([permuted_probs, torch.full((budget,), 0.3)])
    stats = S.expert_output_stats_EH1(out, permuted_probs, counts, 0, experts)
    for e in range(experts):
        chosen = routing_map[:, e].nonzero().squeeze(-1)
        want = (x[chosen] @ W[e]).sum(0)
        torch.testing.assert_close(stats[e, :hidden], want, atol=1e-4, rtol=1e-4)
        assert stats[e, hidden] == len(chosen)


def test_bad_weighting_names_the_flag():
    with pytest.raises(ValueError, match="ema_weighting"):
        S.expert_output_stats_EH1(torch.zeros(2, 3), torch.ones(2), [2], 0, 1, "mean")


@pytest.mark.parametrize("weighting", ["uniform", "router"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_rows_give_zero_statistics(weighting, dtype):
    """A rank whose local experts got no token this micro-batch (EP: common)."""
    for counts in ([0, 0], torch.tensor([0, 0])):
        stats = S.expert_output_stats_EH1(torch.zeros(0, 8, dtype=dtype), torch.zeros(0), counts, 1, 4, weighting)
        assert stats.shape == (4, 9) and not stats.any()
