"""``DefaultMoELayer``: Megatron's ``MoELayer`` plus EMA default vectors and the default term.

Forward of one training micro-batch (``update="microbatch"``, the paper's setting):

1. ``route``: the ``DefaultMoERouter`` leaves ``default_term``: what the default weights (π where
   TopK probs are 0) and their logits gradient need.
2. Experts run as usual. On the expert rank the dispatcher mixin hands their output to
   ``_on_expert_output``, which scatters per-expert ``[sum | count]`` into an fp32 ``[E, H+1]``
   tensor and launches its all-reduce over all ranks of the pipeline stage (``tp_dp_cp``)
   asynchronously, so it overlaps the combine.
3. ``postprocess`` (token's home rank): wait, EMA-update ``default_vectors`` (update before use),
   take a detached snapshot, add ``weights_TE @ snapshot`` to the combined output (``forward``
   mode); in backward, ``dL/dy @ snapshotᵀ`` reaches the logits with Megatron's gradient.

Where the statistics come from, and what the term's table is, is the layer's ``estimator``
(``estimators/``): the routed rows' EMA above (``routed_rows.py``), the probes' mean (``probes.py``:
``route`` adds a few unchosen pairs, their rows are taken apart and zeroed before the combine, and
the EMA follows the experts' output on tokens that did not choose them), or the ``shared-1`` line
fitted from the probes (``shared_fit.py``: a line per expert in one input coordinate).

Activation recompute runs the forward twice: first under ``no_grad`` (the update happens here and
the snapshot is queued), then again with grad in backward (the queued snapshot is reused, nothing
is updated or reduced), so both passes agree and the EMA moves once. Hence a forward in
``train()`` mode under ``no_grad`` counts as such a first pass: run other no-grad forwards
(evaluation) in ``eval()`` mode, as Megatron's ``evaluate`` does. In eval the vectors are
frozen. With ``update="step"`` the forward only accumulates statistics (grad-enabled passes);
``update_default_vectors`` reduces and applies them once per optimizer step.
"""

import collections
import dataclasses
import logging

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.router import TopKRouter

from megatron_default_moe import functional as F
from megatron_default_moe.config import DefaultMoEConfig
from megatron_default_moe.dispatcher import with_default_moe_mixin
from megatron_default_moe.estimators.choice import estimator_of
from megatron_default_moe.router import DefaultMoERouter
from megatron_default_moe.tables import TableBuffers

logger = logging.getLogger(__name__)


def _group_size(group) -> int:
    if group is None or not torch.distributed.is_initialized():
        return 1
    return torch.distributed.get_world_size(group)


def _group_rank(group) -> int:
    if group is None or not torch.distributed.is_initialized():
        return 0
    return torch.distributed.get_rank(group)


def with_default_moe_router(submodules: MoESubmodules) -> MoESubmodules:
    """``submodules`` with Megatron's stock ``TopKRouter`` replaced by ``DefaultMoERouter``."""
    router = submodules.router
    if router is TopKRouter:
        return dataclasses.replace(submodules, router=DefaultMoERouter)
    if isinstance(router, type) and issubclass(router, DefaultMoERouter):
        return submodules
    raise ValueError(
        f"Default MoE needs MoESubmodules.router to be TopKRouter or DefaultMoERouter, got {router!r}"
    )


class DefaultMoELayer(TableBuffers, MoELayer):
    """Megatron ``MoELayer`` with Default MoE (arXiv 2504.12463); see the module docstring.

    Built like ``MoELayer`` plus ``dm_config``. Owns ``default_vectors`` ``[num_moe_experts,
    hidden_size]`` (fp32, persistent, identical on every rank).
    """

    def __init__(self, config, submodules=None, *args, dm_config: DefaultMoEConfig = None, **kwargs):
        self.dm_config = dm_config if dm_config is not None else DefaultMoEConfig()
        self.dm_config.validate(config)
        self.mode = self.dm_config.resolved_mode(config)  # "forward" or "backward-only"
        super().__init__(config, with_default_moe_router(submodules), *args, **kwargs)
        self.router.default_normaliser = self.dm_config.normaliser
        self.stats_group = self.router.tp_dp_cp_group
        self.counts_rows = _group_rank(self.token_dispatcher.tp_group) == 0  # once per ETP group
        self.token_dispatcher.__class__ = with_default_moe_mixin(type(self.token_dispatcher))
        self.token_dispatcher.on_expert_output = self._on_expert_output

        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        shape = (config.num_moe_experts, config.hidden_size)
        self.register_buffer("default_vectors", torch.zeros(shape, dtype=torch.float32, device=device))
        # Cumulative per-expert count of EMA updates skipped for NaN/Inf statistics.
        self.register_buffer(
            "nonfinite_skips",
            torch.zeros(config.num_moe_experts, dtype=torch.long, device=device),
            persistent=False,
        )
        self.experts_updated = None  # bool [E] of the last EMA update, for logging
        self._phase, self.tokens_shape = None, None
        self._pending = None  # (work handle or None, stats_EH1) between experts and postprocess
        self._recompute_snapshots = collections.deque()
        self._step_stats_EH1 = None
        # Training micro-batches whose statistics were taken: rotates the sampled rows' offset
        # under stats_stride and seeds the probe draws; checkpointed (``sample_counter``).
        self._stats_updates = 0
        self.register_buffer("sample_counter", torch.zeros(1, dtype=torch.long, device=device))
        self.estimator = estimator_of(self)  # routed rows' EMA, probes' mean or the shared-1 line
        self.track_metrics = False  # set by the logging hook: keep the norm ratio below
        self.last_term_norm_ratio = None  # ‖default term‖ / ‖MoE output‖ of the last forward

    @property
    def probes(self):
        """The estimator's ``ProbeSampler`` (None without probes)."""
        return self.estimator.probes

    @property
    def fit(self):
        """The estimator's ``SharedLineFit`` (None unless ``shared-1``)."""
        return self.estimator.fit

    # -- forward -------------------------------------------------------------------------------
    def route(self, hidden_states, padding_mask=None):
        """Route, and decide what this pass does with the default vectors."""
        self._keep_fp32_on(hidden_states.device)
        self.router.track_extra_grad = self.track_metrics
        if not self.training:
            self._phase = "eval"
        elif self.dm_config.update == "step":
            self._phase = "accumulate" if torch.is_grad_enabled() else "frozen"
        elif torch.is_grad_enabled() and self._recompute_snapshots:
            self._phase = "recompute"
        else:
            self._phase = "update"
        probs, routing_map = super().route(hidden_states, padding_mask)
        self.tokens_shape = tuple(hidden_states.shape[:-1])  # [S, b]: where the probes' strata lie
        takes_stats = self._phase in ("update", "accumulate")
        self.estimator.see_input(self, hidden_states, takes_stats)
        self.token_dispatcher.extra_routed_pairs = 0
        if takes_stats:
            probs, routing_map, self.token_dispatcher.extra_routed_pairs = self.estimator.route(
                self, probs, routing_map, self._stats_updates)
        return probs, routing_map

    def _on_expert_output(self, out_RH, probs_R, tokens_per_expert, in_RH=None):
        """Expert rank: per-expert statistics of this micro-batch, reduced or accumulated; returns
        the rows the combine takes (probe rows zeroed)."""
        if self._phase not in ("update", "accumulate"):
            return out_RH
        out_RH, stats_EH1 = self.estimator.take_stats(self, out_RH, probs_R, tokens_per_expert, in_RH,
                                                      self._stats_updates)  # fmt: skip
        self._stats_updates += 1
        if self._phase == "accumulate":
            if self._step_stats_EH1 is None:
                self._step_stats_EH1 = torch.zeros_like(stats_EH1)
            self._step_stats_EH1 += stats_EH1
            return out_RH
        work = None
        if _group_size(self.stats_group) > 1:
            work = torch.distributed.all_reduce(stats_EH1, group=self.stats_group, async_op=True)
        self._pending = (work, stats_EH1)
        return out_RH

    def apply_ema(self, stats_EH1: torch.Tensor, snapshot_dtype=torch.float32) -> torch.Tensor:
        """EMA step from statistics already reduced over the stage (identical on every rank);
        returns the estimator's snapshot in ``snapshot_dtype`` (a copy of the new vectors, one fused
        op on CUDA; with the ``shared-1`` fit its ``([A; B], d)``)."""
        with torch.no_grad():
            snapshot, self.experts_updated = self.estimator.apply(self, stats_EH1, float(self.dm_config.beta),
                                                                  snapshot_dtype)  # fmt: skip
        return snapshot

    def _snapshot_for_this_pass(self, dtype):
        if self._phase == "recompute":
            return self._recompute_snapshots.popleft()
        if self._phase == "update":
            if self._pending is None:
                raise RuntimeError("Default MoE: the dispatcher never reported expert outputs")
            (work, stats_EH1), self._pending = self._pending, None
            if work is not None:
                work.wait()
            snapshot_EH = self.apply_ema(stats_EH1, dtype)
        else:
            snapshot_EH = self.estimator.frozen(self, dtype)
        if self._phase == "update" and not torch.is_grad_enabled():
            self._recompute_snapshots.append(snapshot_EH)  # first pass of activation recompute
        return snapshot_EH

    def postprocess(self, output, shared_expert_output):
        """Combined TopK output plus the default term, on the token's home rank."""
        output = super().postprocess(output, shared_expert_output)
        (inputs, routed_logits), self.router.default_term = self.router.default_term, None
        snapshot_EH, coordinates = self.estimator.term_args(self._snapshot_for_this_pass(output.dtype))
        y_TH = output.view(-1, output.shape[-1])
        if self.track_metrics:
            with torch.no_grad():
                term_TH = F.default_term_TH(inputs.weights(), snapshot_EH.float(), **coordinates)
                self.last_term_norm_ratio = term_TH.norm() / y_TH.float().norm().clamp_min(1e-30)
        wants_grad = torch.is_grad_enabled() and routed_logits.requires_grad
        if self.mode == "backward-only" and not wants_grad:
            return output  # the stock forward, and no router gradient to add to
        weights_TE = inputs.weights(output.dtype) if self.mode == "forward" else None
        sink = inputs.receive_grad if wants_grad else None
        y_TH = F.add_default_term(y_TH, weights_TE, snapshot_EH, self.mode, grad_sink=sink, after=routed_logits,
                                  **coordinates)  # fmt: skip
        return y_TH.view(output.shape)

    # -- step mode -----------------------------------------------------------------------------
    def take_step_stats(self) -> torch.Tensor:
        """This step's accumulated local statistics ``[E, H+1]`` (with a fit ``[E+1, 2H+3]``; zeros
        if none), and reset."""
        stats, self._step_stats_EH1 = self._step_stats_EH1, None
        if stats is None:
            experts, hidden = self.default_vectors.shape
            stats = self.default_vectors.new_zeros(self.estimator.stats_shape(experts, hidden))
        return stats
