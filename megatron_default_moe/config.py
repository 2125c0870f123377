"""``DefaultMoEConfig``: the knobs of Default MoE, checked, and resolved per router (the Megatron
options it cannot run with: ``unsupported.py``)."""

from dataclasses import dataclass
from typing import Optional, Union

from megatron_default_moe.functional import EMA_WEIGHTINGS, MODES, NORMALISERS, forward_mode_allowed
from megatron_default_moe.estimators.probes import PROBE_DRAWS, PROBE_SAMPLES_PER_EXPERT, auto_probe_budget
from megatron_default_moe.estimators.shared_fit import FITS
from megatron_default_moe.unsupported import (cuda_graph_conflict, forward_mode_conflict, probe_conflict,
                                              unsupported_option)  # fmt: skip

UPDATES = ("microbatch", "step")

@dataclass
class DefaultMoEConfig:
    """Default MoE settings (paper defaults: β = 0.9 for 8 experts).

    Args:
        beta: EMA decay of the default vectors, in [0, 1].
        ema_weighting: ``uniform`` (paper) averages unweighted expert outputs; ``router`` weights
            each token's output by its routing prob (paper §4.3).
        update: ``microbatch`` (paper) updates before use in every training micro-batch;
            ``step`` accumulates a global batch and updates once per optimizer step.
        mode: ``forward`` adds the default term; ``backward-only`` adds only its gradient;
            ``auto`` is ``forward`` for softmax with pre-softmax (the paper's router) and
            ``backward-only`` for every renormalised or sigmoid router (``resolved_mode``).
        normaliser: for renormalised routers, divide the default weights by the selected experts'
            score sum (``selected``, DenseMixer's rule, the default) or by all experts' (``all``:
            smaller extra router gradient; see docs/design.md, Routers).
        stats_stride: statistics from every ``stats_stride``-th expert-output row (offset rotating
            per update), so they read ``1 / stats_stride`` of the expert output; 1 (the paper)
            takes every row. The mean is over the whole stage's rows, so at scale a stride of 8
            still averages thousands of rows per expert (see docs/cost.md).
        probes: unchosen (token, expert) pairs each rank sends to the experts per micro-batch for
            the default vectors only (``estimators/probes.py``); the vectors then average the experts'
            outputs on tokens that did *not* choose them, where the default term uses them, and the
            routed rows' statistics are not taken (``stats_stride`` and ``ema_weighting`` then do
            not apply: rejected unless 1 and ``uniform``). 0: off. ``auto``: about 8 per expert
            over the stage, off where probes cannot run (``resolved_probes``). None (default): the
            router family's default: ``auto`` for every renormalised or sigmoid router, 0 (the
            paper's routed-row EMA) for the paper's pre-softmax router (``probed_by_default``).
        probe_draw: ``uniform`` over the pairs with a nonzero default weight, or ``weighted``
            (proportional to it: the vectors then estimate the weight-averaged unchosen output).
        probe_seed: seeds the draws with the checkpointed micro-batch counter (a resume is exact).
        fit: ``constant`` (one vector per expert) or ``shared-1``: each expert's default is linear
            in the token's coordinate on one shared input direction, fitted online from the probes
            (``estimators/shared_fit.py``; needs ``probes``). None (default): ``shared-1`` wherever the
            router family's default probes run, else ``constant`` (``resolved_fit``).
        fit_beta: the ``shared-1`` fit's EMA decay (its slopes, means and direction); None: a window
            of about ``16 H`` probes per expert (``shared_fit.fit_beta``).
    """

    beta: float = 0.9
    ema_weighting: str = "uniform"
    update: str = "microbatch"
    mode: str = "auto"
    normaliser: str = "selected"
    stats_stride: int = 1
    probes: Union[int, str, None] = None
    probe_draw: str = "uniform"
    probe_seed: int = 0
    fit: Optional[str] = None
    fit_beta: Optional[float] = None

    def __post_init__(self):
        if self.probes not in (None, "auto") and (not isinstance(self.probes, int) or isinstance(self.probes, bool)
                                      or self.probes < 0):  # fmt: skip
            raise ValueError(f"--moe-default-probes must be an integer >= 0, 'auto' or unset, got {self.probes!r}")
        if isinstance(self.stats_stride, bool) or int(self.stats_stride) != self.stats_stride or self.stats_stride < 1:
            raise ValueError(f"--moe-default-stats-stride must be an integer >= 1, got {self.stats_stride!r}")
        if self._fixed_budget and self.stats_stride != 1:
            raise ValueError(f"--moe-default-stats-stride {self.stats_stride} does not apply with "
                             "--moe-default-probes: the vectors then average the probe rows only, not the routed "
                             "rows it thins")
        if self._fixed_budget and self.ema_weighting != "uniform":
            raise ValueError(f"--moe-default-ema-weighting {self.ema_weighting!r} does not apply with "
                             "--moe-default-probes (it weights the routed rows); use --moe-default-probe-draw weighted")
        if self.fit not in (None, "constant") and self.probes == 0:
            raise ValueError(f"--moe-default-fit {self.fit} fits the experts' outputs on unchosen tokens: it needs "
                             "--moe-default-probes (a budget or 'auto')")
        if self.fit_beta is not None and not 0.0 <= float(self.fit_beta) <= 1.0:
            raise ValueError(f"--moe-default-fit-beta must lie in [0, 1], got {self.fit_beta}")
        if not 0.0 <= float(self.beta) <= 1.0:
            raise ValueError(f"--moe-default-ema-beta must lie in [0, 1], got {self.beta}")
        for flag, value, allowed in (
            ("--moe-default-ema-weighting", self.ema_weighting, EMA_WEIGHTINGS),
            ("--moe-default-update", self.update, UPDATES),
            ("--moe-default-mode", self.mode, MODES),
            ("--moe-default-normaliser", self.normaliser, NORMALISERS),
            ("--moe-default-probe-draw", self.probe_draw, PROBE_DRAWS),
            ("--moe-default-fit", self.fit, FITS + (None,)),
        ):
            if value not in allowed:
                raise ValueError(f"{flag} must be one of {allowed}, got {value!r}")

    def resolved_mode(self, config) -> str:
        """``forward`` or ``backward-only`` for this router (``auto`` resolved; see ``validate``)."""
        allowed = forward_mode_allowed(config.moe_router_score_function, config.moe_router_pre_softmax)
        if self.mode == "auto":
            return "forward" if allowed else "backward-only"
        return self.mode

    @property
    def _fixed_budget(self) -> bool:
        """Probes asked for with a budget: what they cannot hold is rejected, not turned off."""
        return self.probes not in (None, 0, "auto")

    def requested_probes(self, config) -> Union[int, str]:
        """``probes`` as given, or unset: the router family's default (``probed_by_default``)."""
        if self.probes is not None:
            return self.probes
        return "auto" if probed_by_default(config) else 0

    def resolved_probes(self, config, token_sets: int = 1):
        """``(budget per rank, why)``. ``auto``: ``auto_probe_budget``, or 0 wherever probes cannot
        run (``why`` says which); an integer is taken as given."""
        probes = self.requested_probes(config)
        if probes != "auto":
            return int(probes), ("as given" if self.probes is not None else
                                 "off: the paper's router (softmax with --moe-router-pre-softmax) keeps its routed-row EMA")
        if self.stats_stride != 1 or self.ema_weighting != "uniform":
            return 0, "off: --moe-default-stats-stride / --moe-default-ema-weighting shape the routed statistics"
        conflict = probe_conflict(config)
        if conflict:
            return 0, "off: " + conflict
        budget = auto_probe_budget(config.num_moe_experts, token_sets)
        experts = config.num_moe_experts
        return budget, f"{PROBE_SAMPLES_PER_EXPERT} x {experts} experts / {token_sets} token sets in the stage"

    def resolved_fit(self, config, probes_on: bool) -> str:
        """``fit`` as given, or unset: ``shared-1`` where the family's default probes run, else
        ``constant``."""
        if self.fit is not None:
            return self.fit
        return "shared-1" if probes_on and probed_by_default(config) else "constant"

    def validate(self, config) -> None:
        """Raise ``ValueError`` naming the Megatron flag of any option Default MoE cannot run with
        (``unsupported.py``)."""
        conflict = (unsupported_option(config) or forward_mode_conflict(self.mode, config)
                    or (probe_conflict(config) if self._fixed_budget else None) or cuda_graph_conflict(config))  # fmt: skip
        if conflict:
            raise ValueError(conflict)


def probed_by_default(config) -> bool:
    """Router families whose Default MoE runs with probes (``auto``) and the ``shared-1`` fit unless
    told otherwise: every renormalised (Mixtral, Qwen3, GPT-OSS) or sigmoid (DeepSeek-V3) router,
    where both beat TopK's router gradient in every measured layer (docs/evidence.md). The
    paper's router (softmax over all experts, then top-k: the forward term keeps its mass) keeps
    the paper's method."""
    return not forward_mode_allowed(config.moe_router_score_function, config.moe_router_pre_softmax)
