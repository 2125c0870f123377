"""Where a rank's tokens sit in the global micro-batch, and the probes' strata over them.

The probes' draw is keyed by global token position, not by rank: the global micro-batch
``[S, B_global]`` is cut into strata, each ``m`` consecutive sequence positions of one sample
(``m`` from the stage's probe budget), and each stratum draws one probe token and one expert from
keys hashed from its global id. A rank draws for the strata that meet its tokens; where a stratum's
token lies on another rank (a stratum cut by a sequence-parallel or context-parallel boundary), it
runs a filler (an uncounted pair, as for padding). So every layout over the same global batch,
a one-rank run included, draws the same pairs (``ops/probe_draw.py``). Pure integers: no Megatron.

Megatron's cut, as ``pretrain_gpt.py`` feeds a layer: data-parallel rank ``d`` holds samples
``[d·b, (d+1)·b)`` (``MegatronPretrainingSampler``); context parallelism splits the sequence into
``2·CP`` chunks, rank ``r`` holding chunks ``r`` and ``2·CP-1-r`` (``get_batch_on_this_cp_rank``);
sequence parallelism then cuts that local sequence into ``TP`` contiguous pieces. Under another
cut (packed sequences under CP, a cyclic sampler) the strata ids stay distinct across ranks and
each draw stays uniform within its stratum; only the layout invariance is lost.
"""

import dataclasses

STRATUM_BITS = 24  # a stratum's id: sample << 24 | block (blocks of one sample below 2^24)


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """This rank's place in Megatron's cut of the global micro-batch (ranks: 0-based)."""

    dp_rank: int = 0
    cp_rank: int = 0
    cp: int = 1
    sp_rank: int = 0
    sp: int = 1

    def segments(self, seq_local: int) -> list[tuple[int, int, int]]:
        """``(local start, global start, length)`` runs of this rank's sequence positions (at most
        two; adjacent runs merged)."""
        seq_cp = seq_local * self.sp  # the context-parallel rank's sequence
        chunk = seq_cp // 2 if self.cp > 1 else seq_cp  # CP: two chunks of S / (2·CP)
        starts = [self.cp_rank * chunk, (2 * self.cp - 1 - self.cp_rank) * chunk] if self.cp > 1 else [0]
        mine = (self.sp_rank * seq_local, (self.sp_rank + 1) * seq_local)  # in the CP rank's sequence
        runs = []
        for i, start in enumerate(starts):
            lo, hi = max(mine[0], i * chunk), min(mine[1], (i + 1) * chunk)
            if lo < hi:
                local, glob = lo - mine[0], start + lo - i * chunk
                if runs and runs[-1][0] + runs[-1][2] == local and runs[-1][1] + runs[-1][2] == glob:
                    runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + hi - lo)
                else:
                    runs.append((local, glob, hi - lo))
        return runs


def stratum_size(tokens_in_stage: int, stage_budget: int) -> int:
    """``m``: tokens per stratum, so that at most ``stage_budget`` probes are drawn per global
    micro-batch of ``tokens_in_stage`` tokens (at least half as many; the same ``m`` under every
    layout of that batch)."""
    return max(1, -(-int(tokens_in_stage) // max(int(stage_budget), 1)))


def probe_strata(layout: TokenLayout, seq_local: int, batch: int, m: int) -> list[tuple[int, int, int, int]]:
    """``(id, base, lo, hi)`` per stratum meeting this rank's ``[seq_local, batch]`` tokens (token
    ``t = s·batch + b``, Megatron's flattening of ``[S, B, H]``): its global ``id``; the local
    token index of its first position (``base``, may be negative); the offsets ``lo <= off < hi``
    within it that are this rank's. Its token is ``base + off·batch`` when its draw ``off`` is."""
    strata = []
    sample0 = layout.dp_rank * batch
    for local, glob, length in layout.segments(seq_local):
        for block in range(glob // m, (glob + length - 1) // m + 1):
            assert block < 1 << STRATUM_BITS, "a sample with 2^24 strata or more"
            first = block * m
            lo, hi = max(0, glob - first), min(m, glob + length - first)
            for b in range(batch):
                base = (local + first - glob) * batch + b
                strata.append((((sample0 + b) << STRATUM_BITS) | block, base, lo, hi))
    return strata


def max_strata(layout: TokenLayout, seq_local: int, batch: int, m: int) -> int:
    """The most strata any rank of ``layout``'s cut draws for (``len(probe_strata(...))``): the
    rows that can reach one expert rank from each source rank."""
    most = 0
    for cp_rank in range(layout.cp):
        for sp_rank in range(layout.sp):
            runs = dataclasses.replace(layout, cp_rank=cp_rank, sp_rank=sp_rank).segments(seq_local)
            most = max(most, sum((glob + n - 1) // m - glob // m + 1 for _, glob, n in runs))
    return batch * most
