"""Probes: a few unchosen (token, expert) pairs run by the experts for the default vectors only.

The default term stands in ``Ê_i`` for ``E_i(x)`` on the tokens that did *not* choose expert
``i``, but a chosen-token EMA averages ``E_i`` over the tokens that did (``DESIGN.md`` §1.7). The
unbiased target needs ``E_i(x)`` on unchosen tokens: each rank draws ``budget`` extra pairs per
micro-batch among those with a nonzero default weight, and sends them through Megatron's own
dispatcher like any routed pair. Their rows are excluded from everything but the statistics:

- a probe pair carries a negative prob: ``PROBE_PROB = -1`` (uniform draws) or ``-W_t`` (weighted
  draws: its importance weight). Megatron 0.19's experts multiply each row by its prob after the
  activation (bias included), so a probe row's output is ``p·E_i(x)`` exactly, and the sign tells
  it apart from routed rows (``p > 0``) and padding (``p = 0``);
- before the combine its rows are zeroed in place (``ExcludeProbeRows``: only the probe rows are
  touched, forward and backward), so the layer output gets ``+0`` and the probe rows' gradient is
  exactly zero: nothing reaches the expert weights, the expert input or the probs;
- the router's own outputs (aux, z and global aux losses, the expert-bias token counts, router
  replay) are computed before the probes are added (``add_probes`` runs after the router).

The draw is reproducible and layout-invariant: one pair per stratum of the global micro-batch
(``ops/strata.py``: ``m`` consecutive positions of one sample), keyed by a counter-based hash of
``(seed, counter, layer)`` and the stratum's global id (integer tensor ops: no generator state, the
same bits on any device), the counter carried by the checkpoint. So every layout of the same
global batch (a one-rank run, another world size after a resume) draws the same pairs, and
ranks that hold the same tokens (tensor-parallel peers without sequence parallelism) draw alike.
No host sync: the shapes fix every size.
"""

import logging

import torch

from megatron_default_moe.ops.probe_draw import PROBE_DRAWS, PROBE_PROB, add_probes, probe_seed  # noqa: F401
from megatron_default_moe.ops.probes import probe_exclude, probe_zero
from megatron_default_moe.ops.strata import TokenLayout, max_strata, probe_strata, stratum_size
from megatron_default_moe.estimators.base import Estimator
from megatron_default_moe.estimators.routed_rows import counts_on


PROBE_SAMPLES_PER_EXPERT = 8  # per expert and micro-batch over the stage: ``--moe-default-probes auto``


def auto_probe_budget(num_experts: int, token_sets: int) -> int:
    """The budget per rank of ``--moe-default-probes auto``: ``ceil(8 E / token sets)``, about 8
    probes per expert and micro-batch once the stage's ranks are summed (at least 1). 16 were as
    close to the dense router gradient, at twice the probe rows (docs/evidence.md)."""
    return max(1, -(-PROBE_SAMPLES_PER_EXPERT * int(num_experts) // max(int(token_sets), 1)))


def probe_rows(probs_R: torch.Tensor, max_rows: int):
    """``(rows_B, p_B)``: ``max_rows`` row indices that include every probe row of this rank
    (``p < 0``), and their probs. No host sync: one fixed-size top-k of the smallest probs (the
    negative ones come first)."""
    p_R = probs_R.detach().reshape(-1)
    p_B, rows_B = p_R.topk(min(max_rows, p_R.numel()), largest=False, sorted=False)
    return rows_B, p_B.float()


class ExcludeProbeRows(torch.autograd.Function):
    """The probe rows' statistics, and those rows of the expert output zeroed in place
    (``probe_exclude``: one op), and of its gradient (``probe_zero``; ``rows_B`` holds every probe
    row, ``p_B`` their probs)."""

    @staticmethod
    def forward(ctx, out_RH, rows_B, p_B, counts_L, first, num_experts, count_rows, s_B, in_RH):
        ctx.save_for_backward(rows_B, p_B)
        ctx.set_materialize_grads(False)  # no zeros for the statistics' (non-differentiable) gradient
        stats_EH1 = probe_exclude(out_RH, rows_B, p_B, counts_L, first, num_experts, count_rows, s_B, in_RH)
        ctx.mark_dirty(out_RH)
        ctx.mark_non_differentiable(stats_EH1)
        return out_RH, stats_EH1

    @staticmethod
    def backward(ctx, grad_RH, _):
        if grad_RH is None:
            return (None,) * 9
        rows_B, p_B = ctx.saved_tensors
        if grad_RH._is_view() or not grad_RH.is_contiguous():
            grad_RH = grad_RH.contiguous().clone()
        probe_zero(grad_RH, rows_B, p_B)
        return grad_RH, None, None, None, None, None, None, None, None


class ProbeSampler:
    """A layer's probes: ``add`` after its router, ``exclude`` on the expert rank before the combine.

    ``budget`` pairs per rank and micro-batch (nominal: one per stratum, ``stage_budget`` strata
    over the stage's ``token_sets`` ranks with distinct tokens); ``sources`` bounds how many
    ranks' probes can reach this rank's experts (the dispatcher's expert-TP × EP group);
    ``layout`` places this rank's tokens in the global batch (None: unknown, the rank draws alone,
    its seed keyed by ``token_set``, which names the tokens it routes).
    """

    def __init__(self, budget: int, draw: str, seed: int, sources: int, token_set: int = 0, token_sets: int = 1,
                 layout: TokenLayout | None = None, stage_budget: int | None = None):  # fmt: skip
        self.budget, self.draw, self.seed = int(budget), draw, int(seed)
        self.token_sets = int(token_sets)  # ranks with distinct tokens in the stage: their probes add up
        self.stage_budget = int(stage_budget or self.budget * self.token_sets)
        self.sources = max(int(sources), 1)
        self.layout, self.token_set = layout or TokenLayout(), 0 if layout is not None else int(token_set)
        self.max_rows = self.budget * self.sources  # set per shape by ``add``
        self.last_probes = None  # the last draw: (tokens_B, experts_B, probs_B) and [T, E]
        self._strata = {}  # per shape: (strata_B4, max_rows)

    def strata(self, tokens_shape, device):
        """``(strata_B4, m, batch)`` for a micro-batch of ``[S, b]`` tokens, and ``max_rows`` for
        that shape (host-side, once per shape)."""
        seq, batch = tokens_shape if len(tokens_shape) == 2 else (tokens_shape[0], 1)
        m = stratum_size(seq * batch * self.token_sets, self.stage_budget)
        key = (seq, batch, m, str(device))
        if key not in self._strata:
            rows = probe_strata(self.layout, seq, batch, m)
            covered = sum(hi - lo for _, _, lo, hi in rows)  # add_probes' kernel copies the rows by strata
            assert covered == seq * batch, f"the probes' strata hold {covered} of {seq * batch} token rows"
            strata_B4 = torch.tensor(rows, dtype=torch.int64, device=device).view(-1, 4)
            self._strata[key] = strata_B4, self.sources * max_strata(self.layout, seq, batch, m)
        strata_B4, self.max_rows = self._strata[key]
        return strata_B4, m, batch

    def add(self, probs_TE, routing_map_TE, term_inputs, counter: int, layer_number: int, tokens_shape=None):
        """``(probs, routing_map`` with this micro-batch's probes added (``add_probes``), the number
        of pairs added``)``. ``term_inputs``: the router's ``DefaultTermInputs`` (uniform draws read
        only which pairs have weight 0, its ``chosen_TE``; weighted ones the weights);
        ``tokens_shape``: ``[S, b]`` of the layer's input (default ``[T, 1]``)."""
        seed = probe_seed(self.seed, counter, layer_number, self.token_set)
        strata_B4, m, stride = self.strata(tokens_shape or (routing_map_TE.shape[0], 1), routing_map_TE.device)
        weights_TE = term_inputs.weights() if self.draw == "weighted" else term_inputs.chosen_TE
        probs_TE, routing_map_TE, pairs = add_probes(probs_TE, routing_map_TE, weights_TE, strata_B4, m, stride, seed,
                                                     self.draw)  # fmt: skip
        self.last_probes = (*pairs, tuple(routing_map_TE.shape))
        return probs_TE, routing_map_TE, strata_B4.shape[0]

    @property
    def last_probes_TE(self):
        """Bool ``[T, E]`` of the last draw's counted probes (tests, diagnostics)."""
        tokens_B, experts_B, probs_B, shape = self.last_probes
        return torch.zeros(shape, dtype=torch.bool).index_put_((tokens_B.cpu(), experts_B.cpu()), probs_B.cpu() < 0)

    def exclude(self, out_RH, probs_R, tokens_per_expert_L, first: int, num_experts: int, count_rows: bool,
                in_RH=None, coordinates=None):  # fmt: skip
        """``(out_RH`` with its probe rows zeroed (autograd-aware), the probes' ``[E, H+1]``)``: the
        statistics the vectors follow (the routed rows' are not taken). With ``coordinates``
        (``(rows_B, p_B) -> s_B``) and the expert input ``in_RH``: the ``shared-1`` line's ``[E+1, 2H+3]``
        (``estimators/shared_fit.py``), in the same op."""
        rows_B, p_B = probe_rows(probs_R, self.max_rows)
        counts_L = counts_on(tokens_per_expert_L, out_RH.device)[0]
        s_B = None if coordinates is None else coordinates(rows_B, p_B)
        in_RH = None if s_B is None else in_RH.detach()
        return ExcludeProbeRows.apply(out_RH, rows_B, p_B, counts_L, first, num_experts, count_rows, s_B, in_RH)


def _family(score_function: str) -> str:
    return "sigmoid" if score_function == "sigmoid" else f"renormalised {score_function}"


def token_layout_of(layer) -> TokenLayout | None:
    """Where this rank's tokens sit in Megatron's cut of the global batch (``ops/strata.py``);
    None where Megatron's parallel state is not initialised (a layer built on bare groups)."""
    from megatron.core import parallel_state as ps

    if not torch.distributed.is_initialized():
        return TokenLayout()
    if not ps.model_parallel_is_initialized():
        return None
    sp = layer.config.sequence_parallel
    tp_group = layer.router.tp_group
    return TokenLayout(
        dp_rank=ps.get_data_parallel_rank(),
        cp_rank=ps.get_context_parallel_rank(),
        cp=ps.get_context_parallel_world_size(),
        sp_rank=torch.distributed.get_rank(tp_group) if sp else 0,
        sp=torch.distributed.get_world_size(tp_group) if sp else 1,
    )


def probe_sampler_of(layer) -> ProbeSampler:
    """The probes of a ``DefaultMoELayer`` (None if its budget resolves to 0): ranks routing the same
    tokens (TP peers without sequence parallelism) draw alike, and count once among the stage's
    token sets (``auto``'s budget); probes reach its experts from the dispatcher's expert-TP × EP group."""
    dist = torch.distributed
    token_set, token_sets, sources = 0, 1, 1
    if dist.is_initialized():
        tp_group, ep_group = layer.router.tp_group, layer.token_dispatcher.tp_ep_group
        tp = dist.get_world_size(tp_group)
        shared = tp > 1 and not layer.config.sequence_parallel  # TP peers route the same tokens
        token_set = min(dist.get_process_group_ranks(tp_group)) if shared else dist.get_rank()
        token_sets = max(1, dist.get_world_size(layer.stats_group) // (tp if shared else 1))
        sources = dist.get_world_size(ep_group) if ep_group is not None else 1
    dm = layer.dm_config
    budget, why = dm.resolved_probes(layer.config, token_sets)
    auto = dm.requested_probes(layer.config) == "auto"
    if auto:
        score = layer.config.moe_router_score_function
        origin = "auto" if dm.probes == "auto" else f"unset, auto for {_family(score)} routers"
        logging.getLogger(__name__).info("Default MoE layer %s: --moe-default-probes %s -> %d (%s)",
                                         layer.layer_number, origin, budget, why)  # fmt: skip
    if not budget:
        return None
    stage_budget = PROBE_SAMPLES_PER_EXPERT * layer.config.num_moe_experts if auto else budget * token_sets
    return ProbeSampler(budget, dm.probe_draw, dm.probe_seed, sources, token_set, token_sets,
                        token_layout_of(layer), stage_budget)  # fmt: skip


class ProbeMean(Estimator):
    """The default as the EMA of the probes' mean: the experts' output on tokens that did not
    choose them (the routed rows are not read)."""

    def __init__(self, probes: ProbeSampler):
        self.probes = probes

    def route(self, layer, probs_TE, routing_map_TE, counter: int):
        return self.probes.add(probs_TE, routing_map_TE, layer.router.default_term[0], counter, layer.layer_number,
                               layer.tokens_shape)  # fmt: skip

    def take_stats(self, layer, out_RH, probs_R, tokens_per_expert, in_RH, counter: int):
        return self._exclude(layer, out_RH, probs_R, tokens_per_expert)

    def _exclude(self, layer, out_RH, probs_R, tokens_per_expert, **line):
        return self.probes.exclude(out_RH, probs_R, tokens_per_expert, layer.local_expert_indices[0],
                                   layer.config.num_moe_experts, layer.counts_rows, **line)  # fmt: skip
